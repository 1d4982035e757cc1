"""Math final-answer verification: extract the answer, then decide equivalence with sympy.

`verify_math(answer_text, reference)` extracts the candidate's final answer (the last
`\\boxed{}`/`\\fbox{}`, else "the answer is ...", else a GSM8K `#### ...` line, else the last
number in the text) and compares it with the reference by value, not by string:

- Equal strings are equal answers: after the decoration below is removed, answers equal up to
  whitespace and letter case match before any parsing (as in Qwen's grader), so `\\infty`,
  `[0,\\infty)` and `\\text{Yes}` == `yes` need no evaluation.
- LaTeX forms are rewritten into sympy syntax (`\\frac`, `\\dfrac`, `\\sqrt[n]{}`, `\\cdot`,
  `\\times`, `^`, `\\pi`, `\\left(`...), then parsed with `sympy.parse_expr`; numbers are equal
  when their values agree to a relative 1e-6 (so `0.5 == 1/2 == \\frac{1}{2}`, but a rounded
  `0.33 != 1/3`; precisely |a - b| <= 1e-6 * max(1, |b|), so an absolute 1e-6 below 1),
  infinities only when equal (`\\infty == oo`, `-\\infty != \\infty`), expressions when
  they agree at three fixed rational points (`xy == yx`, `(x+1)^2 == x^2+2x+1`), which
  stays fast where `simplify()` can take seconds.
- Units and decoration are ignored: `$`, `\\text{cm}`, trailing unit words of 2+ letters, degrees,
  thousands separators (`1,000`, LaTeX's `1{,}000`), and a leading `x =`. A unit's exponent
  goes with the unit (`12 \\text{ cm}^2`, `8\\mbox{m}^3`, `12\\ \\mathrm{cm}^{2}`, `12 cm^2` are 12,
  not 144).
- Percent: `50\\%` equals both `50` and `0.5`; an answer without `%` is compared as written.
- Tuples/coordinates compare element-wise in order, and their brackets must match: for an
  interval the bracket says whether an end is included, so `[1,2] != (1,2)` and
  `(1,2] != [1,2)`; unions of intervals (`\\cup`) compare piece by piece in order.
- Sets `\\{1,2\\}` and unbracketed lists of answers (`1, 2`, `x = 1, 2`, `x = -1, x = 3`: the
  roots of an equation) compare without order, element by element as multisets (each element
  of one equal to a different element of the other), so `\\{1,2\\} == \\{2,1\\}` and
  `1, 2 == 2, 1`, but `1, 2 != 1, 3` and `1, 2 != 1, 2, 2`. (Against anything else, such as a
  tuple, they compare as before: as the normalised strings.)
- Anything that does not parse falls back to comparing the normalised strings, ignoring
  letter case (multiple-choice letters, words).

Safety: a model's answer is adversarial (RL optimises against the check), so every judgement is
bounded in time and memory, whatever the answer contains:

- Time: `verify_math`, `math_equal`, `judge_math` and `compare_math` take `timeout_s` (default
  `DEFAULT_TIMEOUT_S`, 2 s). Equal strings and two plain decimal numbers are decided in the
  calling process without sympy; everything else runs in a worker process (`math_worker`: one
  per calling process, a fresh interpreter kept between answers), which the caller SIGKILLs
  and replaces when the budget runs out; the answer is then wrong with reason "timeout". A
  forked child of the caller starts its own worker, and `shutdown_worker` ends it at exit.
- Memory: the worker runs under RLIMIT_AS = `MEMORY_LIMIT_MB` (1 GiB); a MemoryError there is
  reason "too large".
- Size, checked before sympy evaluates anything (`math_guards`): an answer (or reference) over
  1000 characters, brackets nested deeper than 30, or an expression whose exact evaluation at
  the sample points would need more than 2^17 bits is refused with reason "too large" (an upper
  bound computed on the syntax tree of the parse: `(x^{1000})^{1000}`, `10^{10^{10}}`,
  `9^9^9^9`, `e^{e^{e^{e^{x}}}}`), as is one exponent over 1000; a refused answer can still
  equal the reference as a string. Scalars over 300 characters are compared as strings only
  (as before).
- Code: `parse_expr` evaluates Python, so only a whitelist of characters and identifiers is
  ever parsed.

`judge_math` / `compare_math` return a `MathVerdict` (`correct`, and a `reason`: "equal",
"different", "no answer", "too large", "timeout" or "error" when the worker died); `verify_math`
and `math_equal` return its bool.

This module holds the public API and the comparison itself (`_compare_here`, which the worker
runs); `math_guards` holds the size guards and `math_worker` the worker process and its client.
"""

from __future__ import annotations

import ast
import builtins
import cmath
import re
import types
from dataclasses import dataclass
from typing import List, Optional

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                        standard_transformations, stringify_expr)

from data_prep.verifiers import math_guards
from data_prep.verifiers.math_guards import _MAX_DEPTH, _TooLarge, _depth, _guard_powers, _size
from data_prep.verifiers.math_worker import (DIFFERENT, EQUAL, ERROR, MEMORY_LIMIT_MB, NO_ANSWER, TIMEOUT, TOO_LARGE,
                                             _compare_in_worker, shutdown_worker, worker_pid)

__all__ = ["DEFAULT_TIMEOUT_S", "MEMORY_LIMIT_MB", "EQUAL", "DIFFERENT", "NO_ANSWER", "TOO_LARGE", "TIMEOUT", "ERROR",
           "MathVerdict", "compare_math", "extract_answer", "judge_math", "math_equal", "verify_math",
           "shutdown_worker", "worker_pid"]

_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)
_FUNCS = {"sqrt": sympy.sqrt, "pi": sympy.pi, "oo": sympy.oo, "log": sympy.log, "ln": sympy.log,
          "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "exp": sympy.exp, "Rational": sympy.Rational}
_MAX_LEN = 300
_REL_TOL = 1e-6
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"

DEFAULT_TIMEOUT_S = 2.0
"""Seconds one comparison of two answers may take (see the module doc)."""
_MAX_ANSWER_CHARS = 1000  # whole answers (tuples, unions) longer than this are refused
_PLAIN = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")  # decided without sympy (up to 15 digits)
_UNIT_POWER = r"(?:\^\s*(?:\{\s*\d+\s*\}|\d+))?"  # the exponent of a unit: cm^2, \text{m}^{3}


@dataclass(frozen=True)
class MathVerdict:
    """The judgement of one answer: whether it is correct, and why."""

    correct: bool
    reason: str
    """`equal`; `different`; `no answer` (no final answer found); `too large` (refused by a size
    guard before evaluation, or out of memory); `timeout` (the time budget ran out); `error`
    (the worker process died)."""

    def __bool__(self) -> bool:
        return self.correct


def _braced(text: str, start: int) -> Optional[tuple]:
    """Content of the brace group opening at text[start] ('{') and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def _last_boxed(text: str) -> Optional[str]:
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = idx + (6 if text.startswith("\\boxed", idx) else 5)
    while rest < len(text) and text[rest] == " ":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        got = _braced(text, rest)
        return got[0] if got else None
    m = re.match(r"\S+", text[rest:])  # "\boxed 5"
    return m.group(0).rstrip("$.") if m else None


def extract_answer(text: str) -> Optional[str]:
    """The final answer in a model's response, or None when it states none."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = list(re.finditer(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s|\.$|\n|$)", text, re.IGNORECASE))
    if m:
        return m[-1].group(1).strip()
    m = list(re.finditer(r"####\s*([^\n]+)", text))
    if m:
        return m[-1].group(1).strip()
    nums = re.findall(_NUMBER, text)
    return nums[-1].rstrip(",") if nums else None


def _strip_decoration(s: str) -> str:
    """Remove LaTeX spacing, units, dollar signs, degrees and an 'x =' prefix."""
    s = s.strip().strip("$").strip().replace("\\$", "")
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\displaystyle", "~"):
        s = s.replace(tok, "" if tok != "~" else " ")
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # a LaTeX space "\ " (not the end of a "\\" row break)
    s = re.sub(r"(?<=\d)\{,\}(?=\d)", "", s)  # LaTeX's thousands separator: 1{,}000
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    # Units in \text{...}/\mbox{...}, with their exponent (cm^2): drop them when something else remains.
    stripped = re.sub(r"\\(?:text|mbox|mathrm|textbf)\s*\{[^{}]*\}" + _UNIT_POWER, "", s).strip()
    s = stripped if stripped else re.sub(r"\\(?:text|mbox|mathrm|textbf)\s*\{([^{}]*)\}", r"\1", s)
    m = re.fullmatch(r"\s*[A-Za-z]\w*\s*=\s*(.+)", s)  # "x = 5" -> "5"
    if m and "=" not in m.group(1):
        s = m.group(1)
    # "12 cm", "5 dollars": trailing words of two or more letters are units; a single letter
    # ("2x") is a variable and stays.
    m = re.fullmatch(r"([-+]?[\d.,/\s]*\d%?)\s*([A-Za-z][A-Za-z\s.]*?)\s*" + _UNIT_POWER, s)
    if m and len(re.sub(r"[\s.]", "", m.group(2))) >= 2 and m.group(2).strip() not in _FUNCS:
        s = m.group(1)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?%?", s.replace("\\%", "%")):
        s = s.replace(",", "")
    return s


def _latex_to_sympy(s: str) -> str:
    """Rewrite the LaTeX subset found in final answers into sympy syntax."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"{\1}/{\2}", s)  # \frac12
    while "\\frac" in s:
        i = s.find("\\frac")
        j = i + 5
        num = _braced(s, j) if j < len(s) and s[j] == "{" else None
        den = _braced(s, num[1]) if num and num[1] < len(s) and s[num[1]] == "{" else None
        if not den:
            raise ValueError("malformed \\frac")
        s = s[:i] + f"(({num[0]})/({den[0]}))" + s[den[1]:]
    s = re.sub(r"\\sqrt\s*\[([^\]]+)\]\s*\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"sqrt(\1)", s)
    s = s.replace("\\sqrt", "sqrt")
    for tex, py in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "pi"), ("\\infty", "oo"),
                    ("\\ln", "log"), ("\\log", "log"), ("\\exp", "exp"), ("\\sin", "sin"), ("\\cos", "cos"),
                    ("\\tan", "tan")):
        s = s.replace(tex, f" {py} " if py.isalpha() else py)
    return s.replace("{", "(").replace("}", ")").replace("^", "**")


def _parser_globals() -> dict:
    """The global namespace `parse_expr` builds on every call (built once here)."""
    names: dict = {}
    exec("from sympy import *", names)  # noqa: S102 - sympy's own namespace, as parse_expr does
    names.update({k: v for k, v in vars(builtins).items() if isinstance(v, types.BuiltinFunctionType)})
    names.update(max=sympy.Max, min=sympy.Min)
    return names


_GLOBALS = _parser_globals()


def _parse(s: str):
    """A sympy expression for an answer string, or None when it is not an expression.
    Raises _TooLarge for an expression too big to evaluate safely."""
    if len(s) > _MAX_LEN:
        return None
    try:
        py = _latex_to_sympy(s)
    except ValueError:
        return None
    if "\\" in py or not re.fullmatch(r"[0-9A-Za-z+\-*/().\s]*", py) or not py.strip():
        return None
    # Runs of up to three letters that are not functions are products of variables ("xy");
    # longer ones are words, not math: the string comparison decides those.
    if any(len(n) > 3 and n not in _FUNCS for n in re.findall(r"[A-Za-z]+", py)):
        return None
    py = re.sub(r"[A-Za-z]+", lambda w: w.group(0) if w.group(0) in _FUNCS else "*".join(w.group(0)), py)
    names = set(re.findall(r"[A-Za-z]+", py))
    local = dict(_FUNCS)
    local.update({n: sympy.Symbol(n) for n in names if len(n) == 1})
    if math_guards._STATIC_GUARDS:  # read at each call: tests and the worker's requests switch it
        if _depth(py) > _MAX_DEPTH:
            raise _TooLarge("brackets nested too deeply")
        try:  # sympy's tokenizer and transformations only: nothing is evaluated yet
            tree = ast.parse(stringify_expr(py, dict(local), _GLOBALS, _TRANSFORMS), mode="eval")
        except Exception:  # noqa: BLE001 - what sympy cannot tokenize or Python cannot parse is no expression
            return None
        try:
            _size(tree)
        except RecursionError:
            raise _TooLarge("nested too deeply") from None
    try:
        expr = parse_expr(py, local_dict=local, global_dict=_GLOBALS, transformations=_TRANSFORMS, evaluate=False)
        _guard_powers(expr)
        return sympy.sympify(expr)
    except _TooLarge:
        raise
    except Exception:  # noqa: BLE001 - any parse failure means "not an expression"
        return None


def _values(s: str) -> List:
    """Candidate values of one scalar answer (two for a percentage: n and n/100)."""
    percent = s.endswith("\\%") or s.endswith("%")
    core = s[:-2] if s.endswith("\\%") else s[:-1] if percent else s
    expr = _parse(core.strip())
    if expr is None:
        return []
    return [expr, expr / 100] if percent else [expr]


def _close(a, b) -> bool:
    fa, fb = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
    if not (cmath.isfinite(fa) and cmath.isfinite(fb)):
        return fa == fb  # oo == oo; inf - inf would be NaN
    return abs(fa - fb) <= _REL_TOL * max(1.0, abs(fb))


def _expr_equal(a, b) -> bool:
    """Numbers: equal values. Expressions: equal at several fixed non-special points, a
    Schwartz-Zippel style identity test that stays fast where simplify() can take seconds
    (e.g. (x+1)^999); two different answer expressions agreeing at all of them is vanishingly rare."""
    try:
        symbols = sorted(a.free_symbols | b.free_symbols, key=str)
        if not symbols:
            return _close(a, b)
        for k in range(3):
            point = {s: sympy.Rational(37 + 17 * k + 5 * j, 23) for j, s in enumerate(symbols)}
            if not _close(a.subs(point), b.subs(point)):
                return False
        return True
    except (TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError):
        return False


def _split_top(s: str, sep: str = ",") -> List[str]:
    """Split on `sep` where it is not inside brackets (a tuple body on commas, a union on \\cup)."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        ch = s[i]
        if depth == 0 and s.startswith(sep, i):
            parts.append(cur)
            cur, i = "", i + len(sep)
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
        i += 1
    return parts + [cur]


def _same_string(a: str, b: str) -> bool:
    return re.sub(r"\s+", "", a).lower() == re.sub(r"\s+", "", b).lower()


def _scalar_equal(a: str, b: str) -> bool:
    norm = lambda t: re.sub(r"[\s{}()]", "", t).lower().replace("\\", "")  # noqa: E731
    try:
        va, vb = _values(a), _values(b)
    except _TooLarge:
        if bool(norm(a)) and norm(a) == norm(b):  # as for any answer that is not evaluated
            return True
        raise
    if va and vb:
        return any(_expr_equal(x, y) for x in va for y in vb)
    return bool(norm(a)) and norm(a) == norm(b)


def _unordered(s: str) -> Optional[List[str]]:
    """The elements of a set `\\{a, b\\}` or of an unbracketed list `a, b` (commas outside any
    bracket: the roots of an equation), or None for anything else (a scalar, a tuple)."""
    parts = _split_top(s)
    if len(parts) > 1:
        return [p.strip() for p in parts]
    m = re.fullmatch(r"\\\{(.*)\\\}", s, re.S)  # one brace group: _split_top found no top-level comma
    return [p.strip() for p in _split_top(m.group(1))] if m else None


def _same_multiset(a: List[str], b: List[str]) -> bool:
    """Each element of `a` equals a different element of `b` and none is left over."""
    if len(a) != len(b):
        return False
    left = list(b)
    for x in a:
        k = next((k for k, y in enumerate(left) if _math_equal(x, y)), None)
        if k is None:
            return False
        del left[k]
    return True


def _math_equal(answer: str, reference: str) -> bool:
    """Whether two final-answer strings denote the same value (see module doc), in this process
    and without a time limit (the worker's part). Raises _TooLarge."""
    a, b = _strip_decoration(answer), _strip_decoration(reference)
    if not a or not b:
        return False
    if _same_string(a, b):
        return True
    ua, ub = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return len(ua) == len(ub) and all(_math_equal(x, y) for x, y in zip(ua, ub))
    ea, eb = _unordered(a), _unordered(b)
    if ea is not None and eb is not None:
        return _same_multiset(ea, eb)
    tuple_re = r"^([(\[])(.*)([)\]])$"
    ta, tb = re.match(tuple_re, a), re.match(tuple_re, b)
    if ta and tb:
        pa, pb = _split_top(ta.group(2)), _split_top(tb.group(2))
        if len(pa) > 1 or len(pb) > 1:
            # Brackets carry meaning: an interval's ends are open or closed.
            return (ta.group(1), ta.group(3)) == (tb.group(1), tb.group(3)) and len(pa) == len(pb) \
                and all(_math_equal(x, y) for x, y in zip(pa, pb))
    return _scalar_equal(a, b)


def _compare_here(answer: str, reference: str) -> str:
    """The reason `_math_equal` gives (`equal`, `different` or `too large`), in this process: what
    the worker (`math_worker._serve`) answers each request with."""
    try:
        return EQUAL if _math_equal(answer, reference) else DIFFERENT
    except (_TooLarge, MemoryError, RecursionError):
        return TOO_LARGE


def _plain_equal(a: str, b: str) -> Optional[bool]:
    """Two plain decimal numbers ("12", "-0.75") of at most 15 digits compared as sympy would
    (Float keeps 15 digits; the tolerance of `_close`); None for anything else."""
    if not (_PLAIN.fullmatch(a) and _PLAIN.fullmatch(b)) or max(sum(c.isdigit() for c in t) for t in (a, b)) > 15:
        return None
    fa, fb = float(a), float(b)
    return abs(fa - fb) <= _REL_TOL * max(1.0, abs(fb))


def compare_math(answer: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> MathVerdict:
    """The verdict on two final-answer strings (see the module doc), within `timeout_s` seconds."""
    if not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    if len(answer) > _MAX_ANSWER_CHARS or len(reference) > _MAX_ANSWER_CHARS:
        same = _same_string(answer, reference)
        return MathVerdict(same, EQUAL if same else TOO_LARGE)
    a, b = _strip_decoration(answer), _strip_decoration(reference)
    if not a or not b:
        return MathVerdict(False, DIFFERENT)
    if _same_string(a, b):
        return MathVerdict(True, EQUAL)
    plain = _plain_equal(a, b)
    if plain is not None:
        return MathVerdict(plain, EQUAL if plain else DIFFERENT)
    reason = _compare_in_worker(answer, reference, timeout_s)
    return MathVerdict(reason == EQUAL, reason)


def math_equal(answer: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two final-answer strings denote the same value (see module doc); False when
    that is not decided within `timeout_s` seconds or the answer is too large to evaluate."""
    return compare_math(answer, reference, timeout_s).correct


def judge_math(answer_text: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> MathVerdict:
    """The verdict on a model response's final answer against `reference` (see `verify_math`)."""
    extracted = extract_answer(answer_text)
    if extracted is None:
        return MathVerdict(False, NO_ANSWER)
    ref = extract_answer(reference) if "\\boxed" in reference else reference
    return compare_math(extracted, ref or "", timeout_s)


def verify_math(answer_text: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether a model response's final answer equals `reference` (a bare answer string).

    Numbers agree within |a - b| <= 1e-6 * max(1, |b|) (so `0.5 == 1/2`, `0.33 != 1/3`);
    equal strings (whitespace and letter case aside) always agree; an answer not judged within
    `timeout_s` seconds, or too large to evaluate, is wrong (`judge_math` says why); see the
    module doc."""
    return judge_math(answer_text, reference, timeout_s).correct
