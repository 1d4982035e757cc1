"""Programmatic math problems with exact answers and worked solutions.

Every problem is generated from `random.Random(f"{seed}:{index}")`, so record i of a corpus is
reproducible on its own. Answers are exact (`fractions.Fraction`); a record is kept only when
(a) its solution's `\\boxed{}` answer is accepted by `data_prep.verifiers.verify_math` against
the stored answer and (b) sympy, working from the problem's own statement (the printed
expression or equation), reaches the same value, so a generator bug cannot slip through.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable, Dict, Iterator, Optional, Tuple

import sympy

from data_prep.synth.records import make_record
from data_prep.verifiers import verify_math

Problem = Tuple[str, str, Fraction, Optional[str]]  # (question, solution, answer, sympy check or None)


def latex(q: Fraction) -> str:
    """Exact answer as the solutions write it: an integer or a reduced (signed) \\frac."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _arith_tree(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(1, 20)
        return str(n), Fraction(n), []
    op = rng.choice(["+", "-", "*"])
    ls, lv, lsteps = _arith_tree(rng, depth - 1)
    rs, rv, rsteps = _arith_tree(rng, depth - 1)
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    shown = {"*": "\\times"}.get(op, op)
    par = lambda v: f"({latex(v)})" if v < 0 else latex(v)  # noqa: E731 - "3 - (-4)", not "3 - -4"
    step = f"{par(lv)} {shown} {par(rv)} = {latex(value)}"
    wrap = lambda s: s if s.isdigit() else f"({s})"  # noqa: E731
    return f"{wrap(ls)} {op} {wrap(rs)}", value, lsteps + rsteps + [step]


def arithmetic(rng: random.Random) -> Problem:
    """A nested integer expression; the solution evaluates it innermost first."""
    expr, value, steps = _arith_tree(rng, 3)
    while not steps:  # a bare number is not a problem
        expr, value, steps = _arith_tree(rng, 3)
    shown = expr.replace("*", "\\times")
    sol = "We evaluate the innermost operations first.\n" + "\n".join(steps)
    return f"Compute ${shown}$.", sol + f"\nSo the value is $\\boxed{{{latex(value)}}}$.", value, expr


def fractions(rng: random.Random) -> Problem:
    """a/b + c/d or a/b * c/d, answered in lowest terms."""
    a, c = rng.randint(1, 9), rng.randint(1, 9)
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    x, y = Fraction(a, b), Fraction(c, d)
    if rng.random() < 0.5:
        value = x + y
        lcd = b * d // math.gcd(b, d)
        sol = (f"The common denominator of {b} and {d} is {lcd}: "
               f"$\\frac{{{a}}}{{{b}}} = \\frac{{{a * lcd // b}}}{{{lcd}}}$ and "
               f"$\\frac{{{c}}}{{{d}}} = \\frac{{{c * lcd // d}}}{{{lcd}}}$.\n"
               f"Adding the numerators gives $\\frac{{{a * lcd // b + c * lcd // d}}}{{{lcd}}}$, "
               f"which reduces to ${latex(value)}$.")
        op, shown = "+", "+"
    else:
        value = x * y
        sol = (f"Multiply numerators and denominators: $\\frac{{{a * c}}}{{{b * d}}}$, "
               f"which reduces to ${latex(value)}$.")
        op, shown = "*", "\\times"
    question = f"Compute $\\frac{{{a}}}{{{b}}} {shown} \\frac{{{c}}}{{{d}}}$ in lowest terms."
    return question, sol + f"\nThe answer is $\\boxed{{{latex(value)}}}$.", value, f"Rational({a},{b}) {op} Rational({c},{d})"


def linear(rng: random.Random) -> Problem:
    """a*x + b = c with a != 0; the answer may be a fraction."""
    a = rng.choice([i for i in range(-9, 10) if i not in (0,)])
    b, c = rng.randint(-20, 20), rng.randint(-20, 20)
    value = Fraction(c - b, a)
    sign = "+" if b >= 0 else "-"
    question = f"Solve for $x$: ${a}x {sign} {abs(b)} = {c}$."
    sol = (f"Move the constant to the right-hand side: ${a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}$.\n"
           f"Divide both sides by ${a}$: $x = \\frac{{{c - b}}}{{{a}}} = {latex(value)}$.\n"
           f"So $x = \\boxed{{{latex(value)}}}$.")
    return question, sol, value, f"solve({a}*x + ({b}) - ({c}))"


def quadratic(rng: random.Random) -> Problem:
    """x^2 + p x + q = 0 with integer roots; asks for the larger root."""
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    p, q = -(r1 + r2), r1 * r2
    poly = "x^2" + (f" {'+' if p >= 0 else '-'} {abs(p)}x" if p else "") + (f" {'+' if q >= 0 else '-'} {abs(q)}" if q else "")
    big = Fraction(max(r1, r2))
    f1 = f"(x {'-' if r1 >= 0 else '+'} {abs(r1)})"
    f2 = f"(x {'-' if r2 >= 0 else '+'} {abs(r2)})"
    sol = (f"Look for two numbers with product {q} and sum {-p}: they are {r1} and {r2}.\n"
           f"So ${poly} = {f1}{f2}$, and the roots are $x = {r1}$ and $x = {r2}$.\n"
           f"The larger root is $\\boxed{{{big.numerator}}}$.")
    return f"Find the larger root of ${poly} = 0$.", sol, big, f"max(solve(x**2 + ({p})*x + ({q})))"


def _word_shopping(rng):
    n, price = rng.randint(2, 9), rng.randint(2, 15)
    bill = rng.choice([b for b in (20, 50, 100, 200) if b >= n * price])
    name, item = rng.choice(["Ana", "Ben", "Chen", "Dara"]), rng.choice(["notebooks", "pens", "mugs", "tickets"])
    value = Fraction(bill - n * price)
    q = f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. How much change, in dollars, does {name} get?"
    s = f"The {item} cost ${n} \\times {price} = {n * price}$ dollars. The change is ${bill} - {n * price} = {value}$ dollars."
    return q, s, value


def _word_speed(rng):
    v, t = rng.randint(3, 12) * 10, rng.randint(2, 7)
    q = f"A train travels at {v} km/h for {t} hours. How many kilometres does it travel?"
    return q, f"Distance is speed times time: ${v} \\times {t} = {v * t}$ km.", Fraction(v * t)


def _word_discount(rng):
    price, pct = rng.randint(2, 20) * 20, rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    value = Fraction(price * (100 - pct), 100)
    q = f"A jacket costs ${price}. It is sold at {pct}% off. What is the sale price in dollars?"
    s = (f"The discount is ${pct}\\% \\times {price} = {latex(Fraction(price * pct, 100))}$ dollars, "
         f"so the sale price is ${price} - {latex(Fraction(price * pct, 100))} = {latex(value)}$ dollars.")
    return q, s, value


def _word_share(rng):
    k, each, left = rng.randint(3, 8), rng.randint(2, 9), 0
    left = rng.randint(0, k - 1)
    total = k * each + left
    q = f"{total} apples are shared equally among {k} friends, each getting as many as possible. How many apples are left over?"
    s = f"${k} \\times {each} = {k * each}$ apples are handed out, so ${total} - {k * each} = {left}$ are left over."
    return q, s, Fraction(left)


def word_problem(rng: random.Random) -> Problem:
    """One of a few everyday templates (shopping change, distance, discount, remainders)."""
    q, s, value = rng.choice([_word_shopping, _word_speed, _word_discount, _word_share])(rng)
    return q, s + f"\nThe answer is $\\boxed{{{latex(value)}}}$.", value, None


KINDS: Dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": arithmetic, "fractions": fractions, "linear": linear, "quadratic": quadratic,
    "word_problem": word_problem}


def sympy_value(check: str) -> Fraction:
    """Evaluate a generator's independent check expression (built from the printed problem)."""
    x = sympy.Symbol("x")
    env = {"x": x, "Rational": sympy.Rational, "solve": lambda e: sympy.solve(e, x), "max": max}
    value = eval(check, {"__builtins__": {}}, env)  # noqa: S307 - our own generated expression
    if isinstance(value, list):
        (value,) = value
    value = sympy.nsimplify(value)
    return Fraction(int(value.p), int(value.q))


def verified(question: str, solution: str, answer: Fraction, check: Optional[str]) -> bool:
    """The solution's boxed answer matches, and (where possible) sympy agrees from the problem."""
    if not verify_math(solution, latex(answer)):
        return False
    return check is None or sympy_value(check) == answer


def generate(kind: str, n: int, seed: int) -> Iterator[dict]:
    """Yield up to n verified records of `kind` (a problem failing verification is skipped)."""
    if kind not in KINDS:
        raise ValueError(f"unknown math kind {kind!r}; choose from {sorted(KINDS)}")
    for index in range(n):
        rng = random.Random(f"{seed}:{kind}:{index}")
        question, solution, answer, check = KINDS[kind](rng)
        if not verified(question, solution, answer, check):
            continue
        yield make_record(f"Problem: {question}\nSolution: {solution}", "math", kind, "programmatic",
                          f"data_prep.synth.math_gen:{kind}", seed, index, problem=question,
                          solution=solution, answer=latex(answer))
