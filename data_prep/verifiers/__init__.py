"""Verifiers shared by synthetic-data rejection sampling and RL rewards.

- `verify_math(answer_text, reference, timeout_s=2.0) -> bool`: final-answer equivalence
  (sympy, not strings), bounded in time and memory; `judge_math` gives the `MathVerdict`
  (correct, and a reason such as "timeout" or "too large").
- `extract_answer(text) -> str | None`: the last `\\boxed{...}`, else "answer is ...", else the last number.
- `run_code_tests(code, tests, timeout_s, memory_mb, trusted_setup="") -> CodeResult`: candidate
  code against assert-style tests in a sandboxed subprocess; `trusted_setup` is the problem's
  helper code, which the tests always see as the problem defines it.
"""

from data_prep.verifiers.code import CodeResult, run_code_tests
from data_prep.verifiers.math import MathVerdict, compare_math, extract_answer, judge_math, math_equal, verify_math

__all__ = ["CodeResult", "run_code_tests", "MathVerdict", "compare_math", "extract_answer", "judge_math",
           "math_equal", "verify_math"]
