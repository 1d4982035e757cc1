"""Static size guards of the math verifier: bounds on what evaluating an answer would cost,
checked before sympy evaluates anything.

A model's answer is adversarial, and sympy's exact arithmetic has no budget of its own: one
big-integer power or gcd can run for minutes or fill memory, out of reach of any signal. The
worker's time limit (`math_worker`) is the backstop; these checks refuse most such answers
before they get there, cheaply and with the clearer reason "too large":

- `_size`: an upper bound, computed on the Python syntax tree that sympy's parser makes of an
  answer, on the bits of the exact rationals its evaluation at the sample points needs; over
  `_MAX_BITS` (2^17) it raises `_TooLarge` (`(x^{1000})^{1000}`, `10^{10^{10}}`, `9^9^9^9`,
  `e^{e^{e^{e^{x}}}}`, `\\sin` of a huge argument).
- `_depth`: bracket nesting, refused past `_MAX_DEPTH` (30) before the parser recurses.
- `_guard_powers`: on the parsed (unevaluated) expression, an exponent over `_MAX_EXPONENT`
  (1000) or of unknown value.

`math` applies them in `_parse`; `_STATIC_GUARDS` switches the first two off (tests do, to reach
the time limit), in the caller and, through each request, in the worker.
"""

from __future__ import annotations

import ast
from fractions import Fraction
from math import ceil, log2
from typing import NamedTuple, Optional

import sympy

_MAX_EXPONENT = 1000
_MAX_DEPTH = 30  # bracket nesting in the sympy form of one scalar
_MAX_BITS = 1 << 17  # bits of the exact rationals evaluating one expression at the sample points
_STATIC_GUARDS = True  # the depth and size guards (tests turn them off to reach the time limit)


class _TooLarge(Exception):
    """An expression refused before evaluation: too big to evaluate safely."""


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
        out = _binop_size(node.op, _size(node.left), _size(node.right))
    elif isinstance(node, ast.UnaryOp):
        a = _size(node.operand)
        exact = -a.exact if isinstance(node.op, ast.USub) and a.exact is not None else \
            a.exact if isinstance(node.op, ast.UAdd) else None
        out = _Size(a.bits, a.mag if isinstance(node.op, (ast.USub, ast.UAdd)) else _UNKNOWN_MAG, exact)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        out = _call_size(node.func.id, node.args)
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


def _binop_size(op: ast.operator, a: _Size, b: _Size) -> _Size:
    """`_size` of `a op b`, given the sizes of its operands."""
    if isinstance(op, (ast.Add, ast.Sub)):
        exact = None if a.exact is None or b.exact is None else \
            a.exact + b.exact if isinstance(op, ast.Add) else a.exact - b.exact
        return _Size(a.bits + b.bits + 1, max(a.mag, b.mag) + 1, _fold(exact))
    if isinstance(op, ast.Mult):
        exact = None if a.exact is None or b.exact is None else a.exact * b.exact
        return _Size(a.bits + b.bits, a.mag + b.mag, _fold(exact))
    if isinstance(op, (ast.Div, ast.FloorDiv)):
        exact = None if a.exact is None or not b.exact or isinstance(op, ast.FloorDiv) else a.exact / b.exact
        return _Size(a.bits + b.bits, a.mag + b.bits, _fold(exact))
    if isinstance(op, ast.Pow):
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
        return _Size(max(a.bits, 1) * times, (a.bits if negative else a.mag) * times, exact)
    return _Size(a.bits + b.bits, _UNKNOWN_MAG)


def _call_size(name: str, args: list) -> _Size:
    """`_size` of the call `name(*args)`: sympy's number and symbol constructors, or a function."""
    if name in ("Integer", "Float", "Number") and len(args) == 1 and isinstance(args[0], ast.Constant):
        text = str(args[0].value)  # at most _MAX_LEN digits (math._parse refuses longer answers)
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
        return _Size(bits, 1)
    if name == "exp":
        return _Size(bits, 1.45 * 2.0 ** min(mag, 1000.0))
    if name in ("log", "ln"):
        return _Size(bits, log2(max(bits, mag) + 1) + 1)
    if name == "sqrt":
        return _Size(bits, mag / 2)
    if name == "Rational":
        return _Size(bits, sum(x.bits for x in sizes))
    return _Size(bits, _UNKNOWN_MAG)


def _depth(s: str) -> int:
    depth = top = 0
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        top = max(top, depth)
    return top
