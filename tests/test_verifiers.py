"""Verifier tables: math final-answer equivalence and the code sandbox's limits."""

import time

import pytest

from data_prep.verifiers import extract_answer, math_equal, run_code_tests, verify_math

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
