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
  thousands separators (`1,000`), and a leading `x =`.
- Percent: `50\\%` equals both `50` and `0.5`; an answer without `%` is compared as written.
- Tuples/coordinates compare element-wise in order, and their brackets must match: for an
  interval the bracket says whether an end is included, so `[1,2] != (1,2)` and
  `(1,2] != [1,2)`; unions of intervals (`\\cup`) compare piece by piece in order.
- Anything that does not parse falls back to comparing the normalised strings, ignoring
  letter case (multiple-choice letters, words).

Safety: a model's answer is adversarial (RL optimises against the check), so every judgement is
bounded in time and memory, whatever the answer contains:

- Time: `verify_math`, `math_equal`, `judge_math` and `compare_math` take `timeout_s` (default
  `DEFAULT_TIMEOUT_S`, 2 s). Equal strings and two plain decimal numbers are decided in the
  calling process without sympy; everything else runs in a worker process, one per calling
  process, started on first use as a fresh interpreter (`subprocess`: fork + exec, so threads,
  CUDA or process groups of the caller are never inherited) and kept (a round trip costs
  ~0.1 ms). When the budget runs out the caller SIGKILLs the worker (no signal inside it could
  interrupt one long big-integer operation) and starts a replacement at once (~0.5 s of
  imports, waited for only by the next answer that needs sympy); the answer is wrong with
  reason "timeout". A forked child of the caller starts its own worker. The worker also sets
  RLIMIT_CPU before each answer (the budget + 2 s), exits when its caller's pipe closes (so it
  cannot outlive a killed caller), and `shutdown_worker` ends it at exit.
- Memory: the worker runs under RLIMIT_AS = `MEMORY_LIMIT_MB` (1 GiB); a MemoryError there is
  reason "too large".
- Size, checked before sympy evaluates anything: an answer (or reference) over 1000 characters,
  brackets nested deeper than 30, or an expression whose exact evaluation at the sample points
  would need more than 2^17 bits is refused with reason "too large" (an upper bound computed on
  the syntax tree of the parse: `(x^{1000})^{1000}`, `10^{10^{10}}`, `9^9^9^9`,
  `e^{e^{e^{e^{x}}}}`), as is one exponent over 1000; a refused answer can still equal the
  reference as a string. Scalars over 300 characters are compared as strings only (as before).
- Code: `parse_expr` evaluates Python, so only a whitelist of characters and identifiers is
  ever parsed.

`judge_math` / `compare_math` return a `MathVerdict` (`correct`, and a `reason`: "equal",
"different", "no answer", "too large", "timeout" or "error" when the worker died); `verify_math`
and `math_equal` return its bool.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import cmath
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from fractions import Fraction
from math import ceil, log2
from pathlib import Path
from typing import List, NamedTuple, Optional

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                        standard_transformations, stringify_expr)

_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)
_FUNCS = {"sqrt": sympy.sqrt, "pi": sympy.pi, "oo": sympy.oo, "log": sympy.log, "ln": sympy.log,
          "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "exp": sympy.exp, "Rational": sympy.Rational}
_MAX_LEN = 300
_MAX_EXPONENT = 1000
_REL_TOL = 1e-6
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"

DEFAULT_TIMEOUT_S = 2.0
"""Seconds one comparison of two answers may take (see the module doc)."""
MEMORY_LIMIT_MB = 1024
"""Address-space limit (RLIMIT_AS) of the worker process that runs sympy."""
_STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports sympy (~0.3 s idle; much more on a loaded host)
_MAX_ANSWER_CHARS = 1000  # whole answers (tuples, unions) longer than this are refused
_MAX_DEPTH = 30  # bracket nesting in the sympy form of one scalar
_MAX_BITS = 1 << 17  # bits of the exact rationals evaluating one expression at the sample points
_STATIC_GUARDS = True  # the depth and size guards (tests turn them off to reach the time limit)
_PLAIN = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")  # decided without sympy (up to 15 digits)

EQUAL, DIFFERENT, NO_ANSWER, TOO_LARGE, TIMEOUT, ERROR = \
    "equal", "different", "no answer", "too large", "timeout", "error"


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


class _TooLarge(Exception):
    """An expression refused before evaluation: too big to evaluate safely."""


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
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    # Units in \text{...}/\mbox{...}: drop them when something else remains.
    stripped = re.sub(r"\\(?:text|mbox|mathrm|textbf)\s*\{[^{}]*\}", "", s).strip()
    s = stripped if stripped else re.sub(r"\\(?:text|mbox|mathrm|textbf)\s*\{([^{}]*)\}", r"\1", s)
    m = re.fullmatch(r"\s*[A-Za-z]\w*\s*=\s*(.+)", s)  # "x = 5" -> "5"
    if m and "=" not in m.group(1):
        s = m.group(1)
    # "12 cm", "5 dollars": trailing words of two or more letters are units; a single letter
    # ("2x") is a variable and stays.
    m = re.fullmatch(r"([-+]?[\d.,/\s]*\d%?)\s*([A-Za-z][A-Za-z\s.]*)", s)
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


def _guard_powers(expr) -> None:
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp.is_number:
            try:
                big = abs(float(node.exp)) > _MAX_EXPONENT
            except (TypeError, ValueError):
                big = True
            if big:
                raise _TooLarge("exponent too large to evaluate safely")


class _Size(NamedTuple):
    """Bounds for one node of the syntax tree of an answer (see `_size`)."""

    bits: float
    """Size in bits of the exact rational its evaluation at a sample point gives."""
    mag: float
    """log2 of the largest |value| it can take there (at least 0)."""
    exact: Optional[Fraction] = None
    """Its value, where it is a small constant (exponents)."""


_SMALL = 64  # bits of a constant folded into `exact`
_SYMBOL = _Size(14, 4)  # sample points (37 + 17k + 5j) / 23, j < 52 symbols: numerators < 2^9, |value| < 2^4
_CONSTANT = _Size(2, 2)  # pi, oo: evaluated numerically
_UNKNOWN_MAG = float("inf")


def _fold(value) -> Optional[Fraction]:
    if value is None or not isinstance(value, Fraction):
        return None
    return value if max(abs(value.numerator), value.denominator).bit_length() <= _SMALL else None


def _number(value: Fraction) -> _Size:
    bits = abs(value.numerator).bit_length() + value.denominator.bit_length()
    return _Size(bits, max(0.0, log2(abs(value))) if value else 0.0, _fold(value))


def _size(node: ast.AST) -> _Size:
    """Upper bounds on what evaluating `node` (the code sympy's parser makes of an answer) costs,
    computed before sympy sees it: the exact rationals of a power grow with the product of the
    exponents, so `(x^{1000})^{1000}` needs ~14 million bits at a sample point, and a gcd of
    such numbers takes minutes. Raises _TooLarge past _MAX_BITS (or an exponent whose value is
    not bounded)."""
    if isinstance(node, ast.Expression):
        return _size(node.body)
    if isinstance(node, ast.BinOp):
        a, b = _size(node.left), _size(node.right)
        op = node.op
        if isinstance(op, (ast.Add, ast.Sub)):
            exact = None if a.exact is None or b.exact is None else \
                a.exact + b.exact if isinstance(op, ast.Add) else a.exact - b.exact
            out = _Size(a.bits + b.bits + 1, max(a.mag, b.mag) + 1, _fold(exact))
        elif isinstance(op, ast.Mult):
            exact = None if a.exact is None or b.exact is None else a.exact * b.exact
            out = _Size(a.bits + b.bits, a.mag + b.mag, _fold(exact))
        elif isinstance(op, (ast.Div, ast.FloorDiv)):
            exact = None if a.exact is None or not b.exact or isinstance(op, ast.FloorDiv) else a.exact / b.exact
            out = _Size(a.bits + b.bits, a.mag + b.bits, _fold(exact))
        elif isinstance(op, ast.Pow):
            if b.exact is not None:
                top, negative = abs(b.exact), b.exact < 0
            elif b.mag <= 30:
                top, negative = Fraction(2) ** ceil(b.mag), True
            else:
                raise _TooLarge("exponent without a bound")
            times = max(1, ceil(top))
            exact = None
            if a.exact is not None and b.exact is not None and b.exact.denominator == 1 and times <= _SMALL \
                    and (a.exact or not negative):
                exact = _fold(a.exact ** int(b.exact))
            out = _Size(max(a.bits, 1) * times, (a.bits if negative else a.mag) * times, exact)
        else:
            out = _Size(a.bits + b.bits, _UNKNOWN_MAG)
    elif isinstance(node, ast.UnaryOp):
        a = _size(node.operand)
        exact = -a.exact if isinstance(node.op, ast.USub) and a.exact is not None else \
            a.exact if isinstance(node.op, ast.UAdd) else None
        out = _Size(a.bits, a.mag if isinstance(node.op, (ast.USub, ast.UAdd)) else _UNKNOWN_MAG, exact)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, args = node.func.id, node.args
        if name in ("Integer", "Float", "Number") and len(args) == 1 and isinstance(args[0], ast.Constant):
            text = str(args[0].value)  # at most _MAX_LEN digits
            try:
                return _number(Fraction(int(text)))
            except ValueError:
                pass
            try:  # a Float: mpmath's, of bounded precision
                value = Fraction(float(text))
            except (ValueError, OverflowError):  # Float('1e999'): of unknown size
                return _Size(64, _UNKNOWN_MAG)
            return _Size(64, _number(value).mag, _fold(value))
        if name == "Symbol":
            return _SYMBOL
        sizes = [_size(a) for a in args]
        bits = sum(x.bits for x in sizes)
        mag = max([x.mag for x in sizes] or [0.0])
        if name in ("sin", "cos", "tan", "exp") and mag > _MAX_BITS:  # argument reduction needs mag bits
            raise _TooLarge(f"{name} of a huge argument")
        if name in ("sin", "cos"):
            out = _Size(bits, 1)
        elif name == "exp":
            out = _Size(bits, 1.45 * 2.0 ** min(mag, 1000.0))
        elif name in ("log", "ln"):
            out = _Size(bits, log2(max(bits, mag) + 1) + 1)
        elif name == "sqrt":
            out = _Size(bits, mag / 2)
        elif name == "Rational":
            out = _Size(bits, sum(x.bits for x in sizes))
        else:
            out = _Size(bits, _UNKNOWN_MAG)
    elif isinstance(node, ast.Name):
        out = _SYMBOL if len(node.id) == 1 else _CONSTANT
    elif isinstance(node, ast.Constant):
        out = _number(Fraction(node.value)) if isinstance(node.value, int) else \
            _Size(4 * len(str(node.value)) + 1, 4 * len(str(node.value)))  # digits, 3.3 bits each
    else:  # nothing else is expected from the whitelisted characters: bounded, of unknown value
        sizes = [_size(c) for c in ast.iter_child_nodes(node)]
        out = _Size(sum(x.bits for x in sizes), _UNKNOWN_MAG)
    if out.bits > _MAX_BITS:
        raise _TooLarge(f"an exact value of over {_MAX_BITS} bits")
    return out


def _depth(s: str) -> int:
    depth = top = 0
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        top = max(top, depth)
    return top


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
    if _STATIC_GUARDS:
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
    """The reason `_math_equal` gives (`equal`, `different` or `too large`), in this process."""
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


# ---------------------------------------------------------------- the worker process

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the data_prep package
_WORKER_MAIN = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.path[0:1] = [sys.argv[1]]; "
                "from data_prep.verifiers.math import _serve; _serve(int(sys.argv[2]))")


class _Worker:
    """A persistent child process running `_compare_here` on requests (one JSON line each)."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.buf = b""
        self.ready = False
        self.seq = 0

    def start(self) -> None:
        # A fresh interpreter (fork + exec): nothing of the caller's threads, CUDA or process
        # group state is inherited; the pipes are its only link.
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, _ROOT, str(MEMORY_LIMIT_MB)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        except OSError as e:
            raise RuntimeError(f"cannot start the math verifier's worker process ({sys.executable}): {e}") from e
        self.buf, self.ready = b"", False

    def _readline(self, deadline: float) -> Optional[bytes]:
        """The next line from the worker; None when the deadline passes first; b"" when it died."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(max(1, ceil(left * 1000))):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def _ensure_ready(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:  # died while idle
            self.close()
        if self.proc is None:
            self.start()
        if not self.ready:
            deadline, line = time.monotonic() + _STARTUP_TIMEOUT_S, b"-"
            while line and line != b"ready":  # (skipping whatever start-up hooks may print)
                line = self._readline(deadline)
            if line != b"ready":
                self.kill()
                raise RuntimeError(f"the math verifier's worker process did not start within {_STARTUP_TIMEOUT_S:.0f}s "
                                   f"(it said {line!r}; its stderr is this process's)")
            self.ready = True

    def compare(self, answer: str, reference: str, timeout_s: float) -> str:
        for _ in range(2):
            self._ensure_ready()
            self.seq += 1
            request = json.dumps({"id": self.seq, "a": answer, "b": reference, "guards": _STATIC_GUARDS,
                                  "cpu_s": timeout_s}).encode() + b"\n"
            try:
                view = memoryview(request)
                while view:  # small: the idle worker takes it at once
                    view = view[self.proc.stdin.write(view):]
                break
            except OSError:  # it died before reading this answer: once more with a new one
                self.kill()
        else:
            return ERROR
        try:
            line = self._readline(time.monotonic() + timeout_s)
        except BaseException:  # e.g. KeyboardInterrupt: its reply would be stale; start afresh
            self.kill()
            raise
        if line is None:  # out of time: SIGKILL it and start the replacement now
            self.kill()
            try:
                self.start()
            except RuntimeError:  # the next answer tries again (and raises if it still cannot)
                pass
            return TIMEOUT
        try:
            reply = json.loads(line)
            if reply["id"] != self.seq or reply["reason"] not in (EQUAL, DIFFERENT, TOO_LARGE, ERROR):
                raise ValueError(line)
            return reply["reason"]
        except (ValueError, KeyError, TypeError):  # it died (b""), or this is no reply: start afresh
            self.kill()
            return ERROR

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.close()

    def close(self, wait_s: float = 2.0) -> None:
        """Close the pipes (an idle worker exits), reap it (SIGKILL after wait_s)."""
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def detach(self) -> None:
        """In a forked child: drop the parent's worker without touching it (close our copies of
        its pipes, so it still sees end-of-file when the parent goes)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            proc.returncode = 0  # not our child: never wait for it


_WORKER: Optional[_Worker] = None
_WORKER_LOCK = threading.Lock()


def _compare_in_worker(answer: str, reference: str, timeout_s: float) -> str:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER.compare(answer, reference, timeout_s)


def worker_pid() -> Optional[int]:
    """The process id of this process's worker, None when none is running."""
    w = _WORKER
    return w.proc.pid if w is not None and w.proc is not None else None


def shutdown_worker() -> None:
    """End this process's worker (run at exit; the next comparison starts a new one)."""
    global _WORKER
    w, _WORKER = _WORKER, None
    if w is not None:
        w.close()


def _after_fork_in_child() -> None:
    global _WORKER, _WORKER_LOCK
    w, _WORKER, _WORKER_LOCK = _WORKER, None, threading.Lock()
    if w is not None:
        w.detach()


atexit.register(shutdown_worker)
os.register_at_fork(after_in_child=_after_fork_in_child)


def _set_limit(which: int, soft: int) -> None:
    import resource

    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard if which == resource.RLIMIT_CPU else soft))


def _serve(memory_mb: int) -> None:
    """The worker's loop: one JSON request per line on stdin, one reply per line on the
    original stdout (anything printed goes to stderr); ends at end-of-file."""
    import resource

    global _STATIC_GUARDS
    _set_limit(resource.RLIMIT_AS, memory_mb << 20)
    _set_limit(resource.RLIMIT_CORE, 0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        rid, reason = None, ERROR
        try:
            req = json.loads(line)
            rid, _STATIC_GUARDS = req["id"], bool(req["guards"])
            used = resource.getrusage(resource.RUSAGE_SELF)
            # A kernel-enforced backstop of the caller's kill: SIGXCPU past the budget + 2 s of CPU.
            _set_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + float(req["cpu_s"])) + 2)
            reason = _compare_here(str(req["a"]), str(req["b"]))
        except Exception:  # noqa: BLE001 - a malformed request or an unforeseen failure: "error"
            pass
        out.write(json.dumps({"id": rid, "reason": reason}).encode() + b"\n")
