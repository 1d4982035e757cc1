"""Verifiers shared by synthetic-data rejection sampling and RL rewards.

- `verify_math(answer_text, reference) -> bool`: final-answer equivalence (sympy, not strings).
- `extract_answer(text) -> str | None`: the last `\\boxed{...}`, else "answer is ...", else the last number.
- `run_code_tests(code, tests, timeout_s, memory_mb) -> CodeResult`: candidate code against
  assert-style tests in a sandboxed subprocess.
"""

from data_prep.verifiers.code import CodeResult, run_code_tests
from data_prep.verifiers.math import extract_answer, math_equal, verify_math

__all__ = ["CodeResult", "run_code_tests", "extract_answer", "math_equal", "verify_math"]
