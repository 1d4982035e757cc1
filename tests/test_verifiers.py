"""Verifier tables: math final-answer equivalence (and its time, size and memory bounds on hostile
answers) and the code sandbox's limits."""

import time
from pathlib import Path

import pytest

from data_prep.verifiers import (MathVerdict, compare_math, extract_answer, judge_math, math_equal, run_code_tests,
                                 verify_math)

MATH_TABLE = [
    # (response, reference, expected)
    (r"so \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", "3/4", True),
    (r"\boxed{\tfrac34}", "0.75", True),
    ("we get 0.75", r"\frac{3}{4}", True),
    (r"\boxed{-\frac{1}{3}}", "-1/3", True),
    (r"\boxed{\frac{-1}{3}}", "-0.3333333333", True),
    (r"\boxed{0.33}", "1/3", False),  # rounded decimals are not the exact value
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{50\%}", "0.5", True),
    (r"\boxed{50}", "0.5", False),
    (r"\boxed{12 \text{ cm}}", "12", True),
    (r"\boxed{5 dollars}", "5", True),
    (r"\boxed{\$5}", "5", True),
    (r"\boxed{90^\circ}", "90", True),
    ("The answer is 1,000.", "1000", True),
    ("#### 42", "42", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\frac{\pi}{2}}", "pi/2", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{x^2+2x}", "(x+1)^2", False),
    (r"\boxed{\frac{x}{2}}", "0.5x", True),
    (r"\boxed{xy}", "yx", True),
    (r"\boxed{2x}", "2", False),  # a single letter is a variable, not a unit
    (r"\boxed{12cm}", "12", True),
    (r"\boxed{3\pi}", "3pi", True),
    (r"\boxed{(x+1)^{999}}", "x", False),  # decided at sample points, no slow simplify()
    (r"\boxed{\text{no}}", "yes", False),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{(1, 2)}", "(1,2)", True),
    (r"\boxed{(2, 1)}", "(1,2)", False),
    (r"\boxed{\text{(B)}}", "(B)", True),
    (r"first \boxed{1} then \boxed{2}", "2", True),  # the last box counts
    (r"\boxed{2}", r"\boxed{\frac{4}{2}}", True),
    ("no final answer", "3", False),
    (r"\boxed{2^{10000000}}", "1", False),  # refused before evaluation, no hang
    (r"\boxed{__import__('os')}", "0", False),  # never evaluated
    # Equal strings, infinities, interval brackets, case of text answers (Qwen's grader).
    (r"\boxed{\infty}", r"\infty", True),  # inf - inf is NaN: equal strings decide first
    (r"\boxed{-\infty}", r"\infty", False),
    (r"\boxed{oo}", r"\infty", True),
    (r"\boxed{[0,\infty)}", r"[0,\infty)", True),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", True),
    (r"\boxed{(0,\infty)}", r"[0,\infty)", False),
    (r"\boxed{[1,2]}", "(1,2)", False),  # an interval's brackets say whether its ends are in it
    (r"\boxed{(1,2]}", "[1,2)", False),
    (r"\boxed{(1,2]}", r"(1, \frac{4}{2}]", True),
    (r"\boxed{(-\infty, 1) \cup (2, \infty)}", r"(-\infty,1)\cup(2,\infty)", True),
    (r"\boxed{(-\infty, 1] \cup (2, \infty)}", r"(-\infty,1)\cup(2,\infty)", False),
    (r"\boxed{\text{Yes}}", "yes", True),
    (r"\boxed{\text{YES}}", "no", False),
    (r"\boxed{1+10^{-7}}", "1", True),  # tolerance: |a - b| <= 1e-6 * max(1, |b|)
    (r"\boxed{1+10^{-5}}", "1", False),
    # A unit's exponent is part of the unit, not of the number.
    (r"\boxed{12 \text{ cm}^2}", "12", True),
    (r"\boxed{12 \text{ cm}^2}", "144", False),
    (r"\boxed{8\mbox{m}^3}", "8", True),
    (r"\boxed{12\ \mathrm{cm}^{2}}", "12", True),
    (r"\boxed{12 cm^2}", "12", True),
    (r"\boxed{12 cm^2}", "144", False),
    (r"\boxed{2x^2}", "2", False),  # a single letter is a variable, with its exponent
    # Sets and unbracketed lists (roots) compare without order; tuples and intervals in order.
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),
    (r"\boxed{\left\{1, \frac{4}{2}\right\}}", r"\{2,1\}", True),
    (r"\boxed{\{1,2\}}", r"\{1,3\}", False),
    (r"\boxed{\{1,2\}}", r"\{1,2,2\}", False),
    (r"\boxed{x = 1, 2}", "2, 1", True),
    (r"\boxed{x = -1, x = 3}", "3, -1", True),
    (r"\boxed{0.5, 3}", r"3, \frac{1}{2}", True),
    (r"\boxed{1, 2}", "1, 3", False),
    (r"\boxed{1, 2}", "1", False),
    (r"\boxed{(1, 2), (3, 4)}", "(3,4), (1,2)", True),
    (r"\boxed{(1, 2), (3, 4)}", "(2,1), (3,4)", False),
    (r"\boxed{[1,2]}", "[2,1]", False),
    # LaTeX's thousands separator.
    (r"\boxed{1{,}000}", "1000", True),
    (r"\boxed{1{,}000{,}000}", "1000000", True),
    (r"\boxed{1{,}000}", "1", False),
]


@pytest.mark.parametrize("response,reference,expected", MATH_TABLE)
def test_math_table(response, reference, expected):
    start = time.monotonic()
    assert verify_math(response, reference) is expected, (response, reference, extract_answer(response))
    assert time.monotonic() - start < 10


def test_extract_answer_forms():
    assert extract_answer(r"x \boxed{\frac{1}{\sqrt{2}}} y") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(r"\boxed 7") == "7"
    assert extract_answer("first 3 apples, then 17 pears") == "17"
    assert extract_answer("") is None
    assert math_equal(r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}")


# ---------------------------------------------------------------- math: hostile answers are bounded

BUDGET_S, SLACK_S = 2.0, 3.0  # slack: a replacement worker's start-up on a loaded machine

HOSTILE_MATH = [
    # (answer, why it would stall an unbounded verifier[, reference: "2" when not given])
    (r"(x^{1000})^{1000}", "each exponent passes alone; ~14M-bit rationals at a sample point (10 s)"),
    (r"((x^{1000})^{1000})^{2}", "~40 s"),
    (r"((x^{1000})^{1000})^{10}", "minutes"),
    (r"\frac{x^{1000}}{y^{1000}}^{1000}", "a quotient raised to a power"),
    (r"(x^{999}+y)^{999}", "a sum raised to a power"),
    (r"10^{10^{10}}", "a power tower"),
    ("9^9^9^9", "a right-associative power tower"),
    (r"x^{x^{x^{x}}}", "unbounded symbolic exponents"),
    (r"e^{e^{e^{e^{x}}}}", "doubly exponential magnitude"),
    (r"\sin((10^{1000})^{1000})", "argument reduction needs millions of digits of pi"),
    (r"\exp((10^{1000})^{1000})", "likewise"),
    ("(" * 40 + "x+1" + ")" * 40, "brackets nested 40 deep"),
    ("1" * 10_000, "a 10k-character answer"),
    ("x+" * 5_000 + "1", "a 10k-character expression"),
    (r"(1, (x^{1000})^{1000})", "inside a tuple", "(1, 2)"),
    (r"(0, 1] \cup (2, 10^{10^{10}}]", "inside a union of intervals", r"(0, 1] \cup (2, 3]"),
]


@pytest.mark.parametrize("answer,why,reference", [t + ("2",) * (3 - len(t)) for t in HOSTILE_MATH],
                         ids=[f"hostile{i}" for i in range(len(HOSTILE_MATH))])
def test_hostile_math_answers_are_refused_within_the_budget(answer, why, reference):
    start = time.monotonic()
    verdict = judge_math(rf"so \boxed{{{answer}}}", reference, timeout_s=BUDGET_S)
    elapsed = time.monotonic() - start
    assert not verdict.correct and verdict.reason in ("too large", "timeout"), (why, verdict)
    assert elapsed < BUDGET_S + SLACK_S, f"{why}: {elapsed:.1f}s"
    assert not verify_math(rf"\boxed{{{answer}}}", reference, timeout_s=BUDGET_S)


def test_factorials_are_never_evaluated():
    start = time.monotonic()
    for answer in (r"1000000!", r"(10^{100})!", r"\text{factorial}(10^{6})"):
        verdict = judge_math(rf"\boxed{{{answer}}}", "2")
        assert verdict == MathVerdict(False, "different"), (answer, verdict)  # not math sympy sees: strings differ
    assert time.monotonic() - start < 1 + SLACK_S


def test_math_verdicts_and_reasons():
    assert judge_math(r"\boxed{\frac{1}{2}}", "0.5") == MathVerdict(True, "equal")
    assert judge_math(r"\boxed{0.33}", "1/3") == MathVerdict(False, "different")
    assert judge_math("no final answer", "3") == MathVerdict(False, "no answer")
    assert compare_math(r"(x^{1000})^{1000}", "x") == MathVerdict(False, "too large")
    # Equal strings never reach the guards; an answer refused unevaluated falls back to its string.
    assert compare_math(r"(x^{1000})^{1000}", r"(x^{1000})^{1000}") == MathVerdict(True, "equal")
    assert compare_math(r"2^{10000000}", r"2^10000000") == MathVerdict(True, "equal")
    assert bool(MathVerdict(True, "equal")) and not MathVerdict(False, "timeout")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout_s"):
            verify_math(r"\boxed{1}", "1", timeout_s=bad)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not _alive(pid)


def test_time_limit_kills_the_worker_and_a_new_one_takes_over(monkeypatch):
    """The backstop: with the static guards off, (x^{1000})^{1000} gets to sympy, which would
    take ~10 s in one big-integer computation; the caller SIGKILLs the worker at the budget."""
    import data_prep.verifiers.math as vm
    from data_prep.verifiers import math_guards

    assert verify_math(r"\boxed{\sqrt{2}/2}", r"\frac{1}{\sqrt{2}}")  # sympy: runs in the worker
    first = vm.worker_pid()
    assert first is not None and _alive(first)
    monkeypatch.setattr(math_guards, "_STATIC_GUARDS", False)
    start = time.monotonic()
    verdict = judge_math(r"\boxed{(x^{1000})^{1000}}", "x", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert verdict == MathVerdict(False, "timeout")
    assert 1.0 <= elapsed < 1.0 + SLACK_S, elapsed
    assert not _alive(first)  # killed and reaped
    monkeypatch.setattr(math_guards, "_STATIC_GUARDS", True)
    assert judge_math(r"\boxed{x^2+2x+1}", "(x+1)^2") == MathVerdict(True, "equal")
    assert vm.worker_pid() not in (None, first)


def test_worker_memory_is_limited_and_it_ends_with_its_caller(tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    import data_prep.verifiers.math as vm

    assert verify_math(r"\boxed{\pi/2}", r"\frac{\pi}{2}+0")
    soft, hard = resource.prlimit(vm.worker_pid(), resource.RLIMIT_AS)
    assert 0 < soft <= hard <= vm.MEMORY_LIMIT_MB << 20
    # A caller that exits normally ends its worker; one that is SIGKILLed leaves it end-of-file.
    script = ("import sys, time\nfrom data_prep.verifiers.math import verify_math, worker_pid\n"
              "assert verify_math(r'\\boxed{2x}', 'x+x')\nprint(worker_pid(), flush=True)\n"
              "time.sleep(float(sys.argv[1]))\n")
    root = str(Path(vm.__file__).resolve().parents[2])
    for sleep_s, kill in ((0, False), (60, True)):
        proc = subprocess.Popen([sys.executable, "-c", script, str(sleep_s)], cwd=root, stdout=subprocess.PIPE,
                                text=True)
        pid = int(proc.stdout.readline())
        assert _alive(pid)
        if kill:
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == (-signal.SIGKILL if kill else 0)
        proc.stdout.close()
        assert _wait_gone(pid), f"worker {pid} outlived its caller (killed={kill})"


def test_a_forked_child_gets_its_own_worker():
    import os

    import data_prep.verifiers.math as vm

    assert verify_math(r"\boxed{3\sqrt{2}}", r"\sqrt{18}")
    parent_worker = vm.worker_pid()
    child = os.fork()
    if child == 0:  # the child must not use (or end) the parent's worker
        try:
            ok = vm.worker_pid() is None and verify_math(r"\boxed{3\sqrt{2}}", r"\sqrt{18}") \
                and vm.worker_pid() not in (None, parent_worker)
            vm.shutdown_worker()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert vm.worker_pid() == parent_worker and verify_math(r"\boxed{(1, 2)}", "(1,2)")


def _judge_on_rank(rank, world_size):
    import torch
    import torch.distributed as dist

    import data_prep.verifiers.math as vm
    from data_prep.verifiers import math_guards

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    start = time.monotonic()
    answers = [r"\boxed{\frac{1}{2}}", r"\boxed{(x^{1000})^{1000}}", r"\boxed{x^2+2x+1}"]
    reasons = [judge_math(a, ref, timeout_s=BUDGET_S).reason for a, ref in zip(answers, ("0.5", "x", "(x+1)^2"))]
    math_guards._STATIC_GUARDS = False  # and the time limit, on every rank at once
    reasons.append(judge_math(r"\boxed{(x^{1000})^{1000}}", "x", timeout_s=1.0).reason)
    math_guards._STATIC_GUARDS = True
    reasons.append(judge_math(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", timeout_s=BUDGET_S).reason)
    total = torch.tensor([float(r == "equal") for r in reasons])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return reasons, total.tolist(), time.monotonic() - start, vm.worker_pid()


def test_math_verification_on_gloo_ranks_at_once():
    from tests.forked_ranks import run_on_ranks

    results = run_on_ranks(_judge_on_rank, 2, timeout=300)
    for reasons, total, elapsed, pid in results:
        assert reasons == ["equal", "too large", "equal", "timeout", "equal"]
        assert total == [2.0, 0.0, 2.0, 0.0, 2.0]
        assert elapsed < 1.0 + 4 * SLACK_S, elapsed
        assert _wait_gone(pid), "a rank's worker outlived the rank"


def _run(code, tests=("assert True",), **kw):
    kw.setdefault("timeout_s", 3.0)
    kw.setdefault("memory_mb", 256)
    return run_code_tests(code, list(tests), **kw)


def test_code_pass_fail_and_errors():
    r = _run("def f(x):\n    return 2 * x", ["assert f(2) == 4", "assert f(3) == 5"])
    assert (r.status, r.passed, r.total) == ("failed", 1, 2) and r.test_errors[1].startswith("AssertionError")
    assert _run("def f(x): return 2 * x", ["assert f(2) == 4"]).all_passed
    assert _run("def f(:", ["assert True"]).status == "error"
    assert _run("import sys; sys.exit(0)").status == "error"
    r = _run("print('hi')\nfrom collections import namedtuple\nP = namedtuple('P', 'a b')", ["assert P(1, 2).a == 1"])
    assert r.all_passed and r.stdout == "hi\n"
    ok = _run("def f():\n    open('out.txt', 'w').write('x')\n    return open('out.txt').read()", ["assert f() == 'x'"])
    assert ok.all_passed, ok  # the candidate's work dir is writable (tests run in a separate process and file system)


SANDBOX_TABLE = [
    # (name, code, expected status)
    ("infinite loop", "while True:\n    pass", "timeout"),
    ("sleep", "import time\ntime.sleep(60)", "timeout"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "forbidden"),
    ("10 GB allocation", "x = bytearray(10 * 1024 ** 3)", "memory"),
    ("socket", "import socket\nsocket.create_connection(('1.1.1.1', 80))", "forbidden"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])", "forbidden"),
    ("os.system", "import os\nos.system('true')", "forbidden"),
    ("ctypes", "import ctypes", "forbidden"),
    ("write outside", "open('/tmp/sandbox_escape_probe', 'w').write('x')", "forbidden"),
    ("caught violation", "try:\n    import socket\nexcept Exception:\n    pass", "forbidden"),
]


@pytest.mark.parametrize("name,code,status", SANDBOX_TABLE, ids=[t[0] for t in SANDBOX_TABLE])
def test_sandbox_table(name, code, status):
    start = time.monotonic()
    r = _run(code, timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert r.status == status, (name, r)
    assert elapsed < 1.5 + 5, f"{name}: took {elapsed:.1f}s, the timeout kill did not work"
