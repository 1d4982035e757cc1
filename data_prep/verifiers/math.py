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

Safety: `parse_expr` evaluates Python, so only a whitelist of characters and identifiers is
ever parsed, and powers with huge exponents are refused before evaluation.
"""

from __future__ import annotations

import cmath
import re
from typing import List, Optional

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                        standard_transformations)

_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)
_FUNCS = {"sqrt": sympy.sqrt, "pi": sympy.pi, "oo": sympy.oo, "log": sympy.log, "ln": sympy.log,
          "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "exp": sympy.exp, "Rational": sympy.Rational}
_MAX_LEN = 300
_MAX_EXPONENT = 1000
_REL_TOL = 1e-6
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


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
                raise ValueError("exponent too large to evaluate safely")


def _parse(s: str):
    """A sympy expression for an answer string, or None when it is not a safe expression."""
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
    try:
        expr = parse_expr(py, local_dict=local, transformations=_TRANSFORMS, evaluate=False)
        _guard_powers(expr)
        return sympy.sympify(expr)  # evaluate now that the size is known to be sane
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
    va, vb = _values(a), _values(b)
    if va and vb:
        return any(_expr_equal(x, y) for x in va for y in vb)
    norm = lambda t: re.sub(r"[\s{}()]", "", t).lower().replace("\\", "")  # noqa: E731
    return bool(norm(a)) and norm(a) == norm(b)


def math_equal(answer: str, reference: str) -> bool:
    """Whether two final-answer strings denote the same value (see module doc)."""
    a, b = _strip_decoration(answer), _strip_decoration(reference)
    if not a or not b:
        return False
    if _same_string(a, b):
        return True
    ua, ub = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return len(ua) == len(ub) and all(math_equal(x, y) for x, y in zip(ua, ub))
    tuple_re = r"^([(\[])(.*)([)\]])$"
    ta, tb = re.match(tuple_re, a), re.match(tuple_re, b)
    if ta and tb:
        pa, pb = _split_top(ta.group(2)), _split_top(tb.group(2))
        if len(pa) > 1 or len(pb) > 1:
            # Brackets carry meaning: an interval's ends are open or closed.
            return (ta.group(1), ta.group(3)) == (tb.group(1), tb.group(3)) and len(pa) == len(pb) \
                and all(math_equal(x, y) for x, y in zip(pa, pb))
    return _scalar_equal(a, b)


def verify_math(answer_text: str, reference: str) -> bool:
    """Whether a model response's final answer equals `reference` (a bare answer string).

    Numbers agree within |a - b| <= 1e-6 * max(1, |b|) (so `0.5 == 1/2`, `0.33 != 1/3`);
    equal strings (whitespace and letter case aside) always agree; see the module doc."""
    extracted = extract_answer(answer_text)
    if extracted is None:
        return False
    ref = extract_answer(reference) if "\\boxed" in reference else reference
    return math_equal(extracted, ref or "")
