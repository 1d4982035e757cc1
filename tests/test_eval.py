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
from tests.gloo import run_on_ranks


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


def test_heldout_synthetic_problems_come_from_their_own_seed_namespace():
    from data_prep.synth import code_gen, math_gen
    from posttrain.evals.tasks import HELDOUT, load_task

    math_task = load_task("math_synth", limit=10)
    assert len(math_task.problems) == 10 and len({p.id.split("/")[1] for p in math_task.problems}) == 5
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
                       (dict(top_p=0.0), "top_p")):
        with pytest.raises(ConfigError, match=words):
            check(EvalConfig(**bad))
