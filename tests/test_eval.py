"""Benchmark evaluation (posttrain/evals, python -m tools.eval).

The arithmetic: pass@k equals the closed form 1 - C(n-c,k)/C(n,k) and a brute-force count over
all k-subsets; maj@k votes over equivalent answers; best-of-N (RM, PRM min/last/product) takes
the highest-scored sample. The pipeline: one spawned process trains tiny SFT, RM and PRM
checkpoints for one step, then runs every task kind through the command line (HumanEval in the
sandbox, held-out synthetic math/code, local GSM8K / MATH / MBPP / ProcessBench files), and the
report's metrics are recomputed from its own per-sample verdicts and scores.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from fractions import Fraction

import pytest

from posttrain.evals import metrics as M
from tests.forked_ranks import run_on_ranks


# ---------------------------------------------------------------- arithmetic


def _brute_pass_at_k(n, c, k):
    hits = [i < c for i in range(n)]
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(hits[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_closed_form_and_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = float(_brute_pass_at_k(n, c, k))
                assert math.isclose(M.pass_at_k(n, c, k), want, abs_tol=1e-12), (n, c, k)
                assert math.isclose(M.pass_at_k_exact(n, c, k), want, abs_tol=1e-12), (n, c, k)
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share of correct samples
    # Large n: the product form stays finite and equals the exact binomial ratio.
    for n, c, k in ((200, 5, 100), (1000, 1, 10), (500, 499, 7), (300, 0, 50)):
        assert math.isclose(M.pass_at_k(n, c, k), M.pass_at_k_exact(n, c, k), rel_tol=1e-9, abs_tol=1e-12)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 5, 2)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 1, 5)


def test_majority_vote():
    assert M.majority_index(["3", "5", "5", "3", "5"]) == 1
    assert M.majority_index(["3", "5", "5", "3"]) == 0  # tie: the answer seen first
    assert M.majority_index([None, None, "7"]) == 2  # no answer never wins
    assert M.majority_index([None, None]) is None
    from posttrain.evals.tasks import answer_classes

    # "1/2", "0.5" and "\frac{1}{2}" are one answer; "3" twice loses to it.
    assert answer_classes(["3", "1/2", "0.5", None, "\\frac{1}{2}", "3"]) == [0, 1, 1, None, 1, 0]
    # An answer too large to evaluate is a class of its own (never equal to another by value).
    assert answer_classes(["1/2", r"(x^{1000})^{1000}", "0.5", r"(x^{1000})^{1000}"], timeout_s=1.0) == [0, 1, 0, 1]
    from posttrain.evals.tasks import Problem, judge

    assert judge(Problem("m", "math", "q", answer="2"), r"so \boxed{10^{10^{10}}}", math_timeout_s=1.0) == \
        {"correct": False, "answer": "10^{10^{10}}", "reason": "too large"}
    from posttrain.evals.runner import sample_metrics

    items = [{"correct": [False, True, True, False], "answers": ["3", "1/2", "0.5", "2"]},   # vote: 1/2 (right)
             {"correct": [True, False, False, False], "answers": ["2", "7", "7", None]},    # vote: 7 (wrong)
             {"correct": [False, False, True, True], "answers": ["4", "9", "1", "1"]}]      # first 2 only: 4
    got = sample_metrics("math", items, k=2)
    assert got["maj@2"] == pytest.approx(1 / 3)  # ties go to the first: [3, 1/2] -> 3, [2, 7] -> 2 (right), [4, 9] -> 4
    got4 = sample_metrics("math", [dict(it) for it in items], k=4)
    assert got4["maj@4"] == pytest.approx(2 / 3)  # 1/2 right, 7 wrong, 1 right
    assert got4["accuracy"] == pytest.approx((2 / 4 + 1 / 4 + 2 / 4) / 3)
    assert got4["pass@2"] == pytest.approx((M.pass_at_k(4, 2, 2) + M.pass_at_k(4, 1, 2) + M.pass_at_k(4, 2, 2)) / 3)
    assert "pass@4" in got4 and "maj@4" not in sample_metrics("code", items, k=4)


def test_best_of_n_picks_the_highest_score():
    assert M.best_index([0.1, 0.7, 0.3]) == 1
    assert M.best_index([0.5, 0.5]) == 0
    assert M.best_index([math.nan, -5.0]) == 1
    from posttrain.evals.runner import prm_reduce, sample_metrics

    # Step probabilities built so that min, last and product each prefer a different sample.
    steps = [[0.9, 0.9, 0.2],    # min 0.2, last 0.2, prod 0.162
             [0.5, 0.6, 0.99],   # min 0.5, last 0.99, prod 0.297
             [0.95, 0.95, 0.9],  # min 0.9, last 0.9, prod 0.812
             []]                 # no steps: never chosen
    prm = [prm_reduce(s) for s in steps]
    assert prm[3] == {"min": None, "last": None, "prod": None}
    assert prm[1]["prod"] == pytest.approx(0.5 * 0.6 * 0.99)
    rows = [{"correct": [False, True, False, False], "rm": [0.3, 2.0, -1.0, 9.0], "prm": prm},
            {"correct": [False, False, True, True], "rm": [5.0, 1.0, 0.0, 1.0], "prm": prm}]
    got = sample_metrics("code", rows, k=3)  # best-of-3: the 4th sample is outside
    assert got["rm@3"] == pytest.approx(0.5)       # picks sample 1 (right), then sample 0 (wrong)
    assert got["prm_last@3"] == pytest.approx(0.5)  # sample 1 both times: right, wrong
    assert got["prm_min@3"] == pytest.approx(0.5)   # sample 2 both times: wrong, right
    assert got["prm_prod@3"] == pytest.approx(0.5)
    flipped = [dict(r, correct=[False, False, True, False]) for r in rows]
    got = sample_metrics("code", flipped, k=3)
    assert (got["rm@3"], got["prm_last@3"], got["prm_min@3"], got["prm_prod@3"]) == (0.0, 0.0, 1.0, 1.0)


def test_processbench_mean_f1_over_splits():
    """ProcessBench reports each split's F1 and their plain mean (not the F1 of pooled accuracies)."""
    from posttrain.evals.runner import table
    from posttrain.prm import processbench_f1

    f1_a, f1_b = processbench_f1(0.5, 1.0), processbench_f1(0.8, 0.6)
    tasks = {"gsm8k.jsonl": {"kind": "processbench", "problems": 4, "metrics": {"processbench_f1": f1_a}},
             "math.jsonl": {"kind": "processbench", "problems": 9, "metrics": {"processbench_f1": f1_b}},
             "math_synth": {"kind": "math", "problems": 3, "metrics": {"accuracy": 0.1}}}
    assert M.processbench_mean_f1(tasks) == pytest.approx((2 / 3 + 0.96 / 1.4) / 2)
    assert M.processbench_mean_f1({"gsm8k.jsonl": tasks["gsm8k.jsonl"]}) is None  # one split: its own F1
    no_f1 = {"kind": "processbench", "problems": 1, "metrics": {"error_acc": None}}
    assert M.processbench_mean_f1({"a": tasks["gsm8k.jsonl"], "b": no_f1}) is None
    text = table({"tasks": tasks, "processbench_mean_f1": M.processbench_mean_f1(tasks)})
    assert text.splitlines()[-1] == f"ProcessBench mean F1 over the splits: {(f1_a + f1_b) / 2:.4f}"


def test_report_table_and_atomic_write(tmp_path):
    from posttrain.evals.runner import table, write_report

    report = {"tasks": {"a": {"problems": 3, "metrics": {"accuracy": 0.5, "pass@2": 0.75}},
                        "b": {"problems": 2, "metrics": {"processbench_f1": 0.25}}}}
    text = table(report)
    assert text.splitlines()[0].split("|")[1:-1] == [" task ", " problems ", " accuracy ", " pass@2 ",
                                                     " processbench_f1 "]
    assert "| a    | 3        | 0.5000   | 0.7500 | -" in text
    out = tmp_path / "sub" / "r.json"
    write_report(report, str(out))
    assert json.loads(out.read_text()) == report and [p.name for p in out.parent.iterdir()] == ["r.json"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused, and nothing half-written stays
        write_report({"x": math.nan}, str(out))
    assert json.loads(out.read_text()) == report


# ---------------------------------------------------------------- tasks


def test_local_file_forms(tmp_path):
    from posttrain.evals.tasks import load_task, messages, program

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                               "answer": "3 + 4 = 7\n#### 7"}) + "\n"
                   + json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    t = load_task(str(gsm))
    assert t.kind == "math" and [p.answer for p in t.problems] == ["7", "\\frac{1}{2}"]
    msgs = messages(t.problems[0], [])
    assert msgs[-1]["role"] == "user" and "\\boxed{}" in msgs[-1]["content"]
    mbpp = tmp_path / "mbpp.jsonl.gz"
    with gzip.open(mbpp, "wt") as f:
        f.write(json.dumps({"task_id": 2, "text": "Write a function to add two numbers.",
                            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}) + "\n")
    t = load_task(str(mbpp))
    assert t.kind == "code" and t.problems[0].id == "2" and "assert add(1, 2) == 3" in t.problems[0].question
    from posttrain.evals.tasks import judge

    p = t.problems[0]
    assert judge(p, "```python\ndef add(a, b):\n    return a + b\n```")["correct"]
    assert not judge(p, "```python\ndef add(a, b):\n    return a - b\n```")["correct"]
    pb = tmp_path / "pb.jsonl"
    pb.write_text(json.dumps({"problem": "Add: 1 + 2", "steps": ["1 + 2 = 3"], "label": -1}) + "\n")
    assert load_task(str(pb)).kind == "processbench"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: unknown row form"):
        load_task(str(bad))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("gsm9k")
    # HumanEval: a whole function replaces the stub; a bare body continues it.
    from posttrain.evals.tasks import Problem

    he = Problem("x", "code", "q", tests=["assert f(2) == 4"], prefix="def f(x):\n    \"\"\"Twice x.\"\"\"\n",
                 entry_point="f")
    assert judge(he, "```python\ndef f(x):\n    return 2 * x\n```")["correct"]
    assert judge(he, "    return x + x\n")["correct"]
    assert not judge(he, "    return x\n")["correct"]
    assert program(he, "    return x\n").startswith(he.prefix)


def test_humaneval_ships_164_problems_judged_in_the_sandbox():
    from posttrain.evals.tasks import humaneval_path, judge, load_task

    task = load_task("humaneval")
    assert len(task.problems) == 164 and task.problems[0].id == "HumanEval/0"
    rows = [json.loads(line) for line in gzip.open(humaneval_path(), "rt")][:3]
    for row, p in zip(rows, task.problems):
        assert judge(p, f"```python\n{row['prompt']}{row['canonical_solution']}```")["correct"], p.id
        assert judge(p, row["canonical_solution"])["correct"], p.id
        assert not judge(p, "    return None\n")["correct"], p.id


def _sandbox_modes():
    from data_prep.verifiers.code import sandbox_problem

    problem = sandbox_problem("bwrap")
    return [pytest.param("bwrap", marks=pytest.mark.skipif(problem is not None, reason=f"isolated sandbox unavailable: {problem}")),
            "unsafe_local"]


# HumanEval problems whose tests use a helper of the prompt as the oracle: (id, helper, completions
# that redefine the helper so the test passes trivially, a wrong answer).
ORACLE_PROBLEMS = [
    ("HumanEval/32", "poly", ["def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 0.0\n",
                              "    global poly\n    poly = lambda xs, x: 0.0\n    return 0.0\n"],
     "    return 0.0\n"),
    ("HumanEval/38", "encode_cyclic", ["def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n",
                                       "    global encode_cyclic\n    encode_cyclic = lambda x: x\n    return s\n"],
     "    return s\n"),
    ("HumanEval/50", "encode_shift", ["encode_shift = str\n\ndef decode_shift(s):\n    return s\n",
                                      "    globals()['encode_shift'] = lambda x: x\n    return s\n"],
     "    return encode_shift(s)\n"),
]


@pytest.mark.parametrize("mode", _sandbox_modes())
def test_humaneval_oracles_come_from_the_problem(mode, monkeypatch):
    """A completion that redefines the prompt's helper a test uses as its oracle fails; the
    canonical solutions (38 calls the helper) pass; wrong answers fail."""
    from posttrain.evals.tasks import humaneval_path, judge, load_task

    monkeypatch.setenv("CODE_SANDBOX", mode)
    problems = {p.id: p for p in load_task("humaneval").problems}
    rows = {r["task_id"]: r for r in map(json.loads, gzip.open(humaneval_path(), "rt"))}
    for pid, helper, cheats, wrong in ORACLE_PROBLEMS:
        p, row = problems[pid], rows[pid]
        assert f"def {helper}(" in p.setup and f"def {p.entry_point}(" not in p.setup, p.setup
        assert judge(p, row["canonical_solution"])["correct"], pid
        assert judge(p, f"```python\n{row['prompt']}{row['canonical_solution']}```")["correct"], pid
        for cheat in cheats:
            assert not judge(p, f"```python\n{cheat}```")["correct"], (pid, cheat)
        assert not judge(p, wrong)["correct"], pid


@pytest.mark.parametrize("mode", _sandbox_modes())
def test_local_code_rows_setup_is_the_tests_oracle(mode, monkeypatch):
    """MBPP's test_imports / test_setup_code (or `setup`) are trusted setup, not a test."""
    from posttrain.evals.tasks import judge, row_problem

    monkeypatch.setenv("CODE_SANDBOX", mode)
    row = {"text": "Write decode, the inverse of encode.", "test_list": ["assert decode(encode('abc')) == 'abc'"],
           "test_imports": ["import math"], "test_setup_code": "def encode(s):\n    return s[::-1] + str(math.pi)[:0]"}
    p = row_problem(row, "mbpp.jsonl:1")
    assert p.tests == row["test_list"] and "import math" in p.setup and "def encode" in p.setup
    assert judge(p, "```python\ndef decode(s):\n    return s[::-1]\n```")["correct"]
    assert judge(p, "```python\ndef decode(s):\n    return encode(s)\n```")["correct"]
    assert not judge(p, "```python\ndef encode(s):\n    return s\ndef decode(s):\n    return s\n```")["correct"]
    with pytest.raises(ValueError, match="setup"):
        row_problem(dict(row, setup=["x"]), "mbpp.jsonl:2")


@pytest.mark.slow
@pytest.mark.parametrize("mode", _sandbox_modes())
def test_every_humaneval_canonical_solution_passes(mode, monkeypatch):
    from posttrain.evals.tasks import humaneval_path, judge, load_task

    monkeypatch.setenv("CODE_SANDBOX", mode)
    rows = [json.loads(line) for line in gzip.open(humaneval_path(), "rt")]
    failures = []
    for row, p in zip(rows, load_task("humaneval").problems):
        for completion in (row["canonical_solution"], f"```python\n{row['prompt']}{row['canonical_solution']}```"):
            if not judge(p, completion)["correct"]:
                failures.append(p.id)
        if judge(p, "    return None\n")["correct"]:
            failures.append(f"{p.id}: `return None` passes")
    assert not failures, failures


def test_heldout_synthetic_problems_come_from_their_own_seed_namespace():
    from data_prep.synth import code_gen, math_gen
    from posttrain.evals.tasks import HELDOUT, load_task

    math_task = load_task("math_synth", limit=10)
    assert len(math_task.problems) == 10 and len({p.id.split("/")[1] for p in math_task.problems}) == 5
    assert len({p.question for p in load_task("math_synth", limit=60).problems}) == 60  # no repeats
    first = math_task.problems[0]
    kind, index = first.id.split("/")[1:]
    (heldout,) = [r for r in math_gen.generate(kind, int(index) + 1, HELDOUT) if r["index"] == int(index)]
    assert (heldout["problem"], heldout["answer"]) == (first.question, first.answer)
    # Training corpora take integer seeds: their rng keys never start with the namespace.
    assert not any(str(seed).startswith(HELDOUT) for seed in range(-1000, 100000))
    train = {r["problem"] for seed in range(3) for r in math_gen.generate("arithmetic", 20, seed)}
    assert not {p.question for p in math_task.problems if "arithmetic" in p.id} & train
    code_task = load_task("code_synth", limit=2)
    assert [p.question for p in code_task.problems] == \
        [code_gen.prompt_of(code_gen.make_task(i, HELDOUT)[1]) for i in range(2)]


def test_eval_config_rules():
    from megatron_ext.config import ConfigError
    from megatron_ext.eval_config import EvalConfig
    from posttrain.evals.runner import check

    check(EvalConfig())
    for bad, words in ((dict(k=4), "temperature"), (dict(k=4, num_samples=2, temperature=1.0), "eval.k"),
                       (dict(tasks=["processbench"]), "eval.prm_load"), (dict(limit=0), "eval.limit"),
                       (dict(top_p=0.0), "top_p"), (dict(tasks=["gsm9k"]), "neither a task"),
                       (dict(math_timeout_s=0.0), "eval.math_timeout_s")):
        with pytest.raises(ConfigError, match=words):
            check(EvalConfig(**bad))


# ---------------------------------------------------------------- end to end


STEP1 = ["model=qwen3_debug", "train.steps=1", "train.warmup_steps=0", "train.micro_batch_size=2",
         "train.global_batch_size=2"]


def _train_and_evaluate(rank, world, root, runs):
    """Tiny SFT policy, RM and PRM checkpoints (one step each), then each `runs` argv through
    tools.eval's command line; (exit code, report or None) per run."""
    from megatron_ext.train import run_stage
    from tools.eval import main

    # The policy's run also evaluates benchmarks during training (eval.train_tasks).
    assert run_stage("sft", STEP1 + [f"checkpoint.dir={root}/policy", "train.eval_interval=1",
                                     "train.eval_iters=1", "eval.train_tasks=[math_synth,code_synth]",
                                     "eval.limit=1", "eval.max_new_tokens=2",
                                     f"logger.metrics_file={root}/metrics.jsonl"]) == 0
    assert run_stage("rm", STEP1 + ["data.seq_length=48", "posttrain.num_samples=4", f"checkpoint.dir={root}/rm"]) == 0
    assert run_stage("prm", STEP1 + ["data.seq_length=80", "posttrain.num_samples=4", f"checkpoint.dir={root}/prm"]) == 0
    out = []
    for i, argv in enumerate(runs):
        path = f"{root}/report{i}.json"
        rc = main([a.format(root=root) for a in argv] + [f"eval.out={path}"])
        try:
            with open(path) as f:
                out.append((rc, json.load(f)))
        except FileNotFoundError:
            out.append((rc, None))
    return out


def _local_files(root):
    (root / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "What is 10 - 6?", "answer": "#### 4"})))
    (root / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"task_id": 1, "text": "Write a function to add two numbers.", "test_list": ["assert add(1, 2) == 3"]},
        {"task_id": 2, "prompt": "Write a function `neg(x)` returning -x.", "tests": ["assert neg(2) == -2"]})))


def _check_sample_task(name, task, k, max_new_tokens):
    items = task["items"]
    assert task["problems"] == len(items) == 2, name
    for it in items:
        assert len(it["completions"]) == len(it["correct"]) == len(it["rm"]) == len(it["prm"]) == k, name
        assert all(isinstance(c, bool) for c in it["correct"])
        assert all(isinstance(s, float) and math.isfinite(s) for s in it["rm"]), name
    # The report's numbers are the arithmetic of its own verdicts and scores.
    from posttrain.evals.runner import sample_metrics

    assert task["metrics"] == pytest.approx(sample_metrics(task["kind"], items, k)), name
    m = task["metrics"]
    assert m["accuracy"] == pytest.approx(sum(sum(it["correct"]) / k for it in items) / len(items))
    rm_pick = [it["correct"][max(range(k), key=lambda j: (it["rm"][j], -j))] for it in items]
    assert m[f"rm@{k}"] == pytest.approx(sum(rm_pick) / len(items))
    assert set(m) >= {"accuracy", "pass@1", f"pass@{k}", f"rm@{k}", f"prm_min@{k}", f"prm_last@{k}", f"prm_prod@{k}"}
    assert (f"maj@{k}" in m) == (task["kind"] == "math")


def test_every_task_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """Through python -m tools.eval's main: all task kinds, k=2 sampled answers of at most 3
    tokens, RM and PRM best-of-2, ProcessBench F1; a wrong reward checkpoint exits 2. Then the
    same greedy run at PP=2 and with two data-parallel replicas (two spawned ranks) gives the
    one-process completions and scores."""
    _local_files(tmp_path)
    k, new = 2, 3
    full = ["checkpoint.load={root}/policy",
            "eval.tasks=[humaneval,math_synth,code_synth,{root}/gsm.jsonl,{root}/mbpp.jsonl,processbench]",
            "eval.limit=2", f"eval.k={k}", "eval.temperature=1.0", f"eval.max_new_tokens={new}", "eval.few_shot=1",
            "eval.rm_load={root}/rm", "eval.prm_load={root}/prm", "eval.batch_size=3"]
    runs = [full,
            ["checkpoint.load={root}/policy", "eval.tasks=[math_synth]", "eval.limit=2", "eval.max_new_tokens=2",
             "eval.rm_load={root}/policy"]]  # not a reward model: refused
    (rc, report), (rc_bad, bad), (rc_greedy, greedy) = run_on_ranks(
        _train_and_evaluate, 1, str(tmp_path), runs + [GREEDY], timeout=900)[0]
    assert rc == 0 and rc_bad == 2 and bad is None
    # Evaluation during training: the benchmark metrics took the loop's metrics path.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bench = {k: v for r in records if r["kind"] == "eval" and r["step"] == 1 for k, v in r.items()
             if k.startswith("bench/")}
    assert set(bench) == {f"bench/{t}/{m}" for t in ("math_synth", "code_synth") for m in ("accuracy", "pass@1")}
    assert all(v in (0.0, 1.0) for v in bench.values())  # one greedy sample of one problem
    tasks = report["tasks"]
    assert list(tasks) == ["humaneval", "math_synth", "code_synth", f"{tmp_path}/gsm.jsonl", f"{tmp_path}/mbpp.jsonl",
                           "processbench"]
    assert report["samples_per_problem"] == k and report["eval"]["k"] == k
    for name, task in tasks.items():
        if name != "processbench":
            _check_sample_task(name, task, k, new)
    assert [it["id"] for it in tasks["humaneval"]["items"]] == ["HumanEval/0", "HumanEval/1"]
    assert tasks[f"{tmp_path}/gsm.jsonl"]["kind"] == "math" and tasks[f"{tmp_path}/mbpp.jsonl"]["kind"] == "code"
    pb = tasks["processbench"]
    from posttrain.prm import earliest_error, processbench_f1

    assert pb["problems"] == 2 and pb["metrics"]["n_error"] == pb["metrics"]["n_correct"] == 1  # eval.limit
    err = [it["predicted"] == it["label"] for it in pb["items"] if it["label"] >= 0]
    ok = [it["predicted"] == it["label"] for it in pb["items"] if it["label"] < 0]
    assert all(it["predicted"] == earliest_error(it["step_probs"]) for it in pb["items"])
    assert pb["metrics"]["processbench_f1"] == pytest.approx(processbench_f1(sum(err) / len(err), sum(ok) / len(ok)))

    # Every verdict is what the verifiers say about the stored completion.
    from posttrain.evals.tasks import judge, load_task

    for name in ("math_synth", f"{tmp_path}/gsm.jsonl", f"{tmp_path}/mbpp.jsonl"):
        for p, it in zip(load_task(name, limit=2).problems, tasks[name]["items"]):
            assert it["correct"] == [judge(p, c)["correct"] for c in it["completions"]], name
    # Pipeline parallel: greedy completions, RM scores and PRM step scores equal PP=1's.
    assert rc_greedy == 0
    (rc2, pp2, rc3, dp2), _ = run_on_ranks(_evaluate, 2, str(tmp_path), [GREEDY + ["parallel.pp=2"], GREEDY],
                                           timeout=600)
    assert rc2 == rc3 == 0
    # Two data-parallel replicas (each a whole model) share the samples: the same report.
    assert [it["completions"] for it in dp2["tasks"]["math_synth"]["items"]] == \
        [it["completions"] for it in greedy["tasks"]["math_synth"]["items"]]
    for name, task in greedy["tasks"].items():
        for a, b in zip(task["items"], pp2["tasks"][name]["items"]):
            if name == "processbench":
                assert a["step_probs"] == pytest.approx(b["step_probs"], abs=1e-5)
            else:
                assert a["completions"] == b["completions"] and a["rm"] == pytest.approx(b["rm"], abs=1e-4)
                assert [list(s.values()) for s in a["prm"]] == [pytest.approx(list(s.values()), abs=1e-5)
                                                                for s in b["prm"]]
    assert len(greedy["tasks"]["math_synth"]["items"][0]["completions"]) == 1


GREEDY = ["checkpoint.load={root}/policy", "eval.tasks=[math_synth,processbench]", "eval.limit=2",
          "eval.max_new_tokens=3", "eval.rm_load={root}/rm", "eval.prm_load={root}/prm"]


def _evaluate(rank, world, root, runs):
    from tools.eval import main

    out = []
    for i, argv in enumerate(runs):
        path = f"{root}/spawned{i}.json"
        out.append(main([a.format(root=root) for a in argv] + [f"eval.out={path}"]))
        if rank == 0:
            with open(path) as f:
                out.append(json.load(f))
        else:
            out.append(None)
    return out


def test_command_line_refuses_bad_input_before_loading_a_model(tmp_path, capsys):
    from tools.eval import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint.load=CKPT" in out and "eval.k=1" in out and "eval.train_tasks=[]" in out
    for argv, words in ((["eval.taks=[x]"], "did you mean eval.tasks"),
                        ([], "needs checkpoint.load"),
                        ([f"checkpoint.load={tmp_path}/none"], "no such checkpoint"),
                        ([f"checkpoint.load={tmp_path}", "eval.tasks=[gsm9k]"], "neither a task"),
                        ([f"checkpoint.load={tmp_path}", "eval.k=2"], "eval.temperature"),
                        (["--bogus"], "unknown flag")):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        assert rc == 2 and words in capsys.readouterr().err, argv
