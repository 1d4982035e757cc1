"""Programmatic code tasks: a function spec, a written solution, and generated unit tests.

Each template has two independent halves: the solution *source text* a model should learn to
write, and a Python *spec* (written differently) that computes the expected output of random
inputs. The tests (`assert name(args) == expected`) come from the spec; a record is written
only when the solution source passes every test in the sandbox (`run_code_tests`), so the text
and the tests are known to agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

from data_prep.synth.records import make_record
from data_prep.verifiers import run_code_tests


@dataclass
class Task:
    """One function-writing task."""

    name: str
    signature: str
    description: str
    solution: str
    spec: Callable
    inputs: List[tuple]

    def tests(self) -> List[str]:
        return [f"assert {self.name}({', '.join(map(repr, args))}) == {self.spec(*args)!r}" for args in self.inputs]


def _ints(rng, n=None, lo=-20, hi=20):
    return [rng.randint(lo, hi) for _ in range(n if n is not None else rng.randint(0, 8))]


def _words(rng):
    pool = ["alpha", "beta", "gamma", "delta", "sun", "moon", "tree", "river", "code", "data"]
    return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))


def count_greater(rng) -> Task:
    k = rng.randint(-5, 10)
    return Task(f"count_greater_than_{k}".replace("-", "minus_"), "xs",
                f"returns how many numbers in the list `xs` are strictly greater than {k}",
                "def {name}(xs):\n    total = 0\n    for x in xs:\n        if x > %d:\n            total += 1\n    return total\n" % k,
                lambda xs: len(list(filter(lambda v: v > k, xs))), [(_ints(rng),) for _ in range(5)])


def clamp_all(rng) -> Task:
    lo = rng.randint(-10, 0)
    hi = lo + rng.randint(1, 15)
    return Task("clamp_all", "xs", f"returns a new list with every number of `xs` limited to the range [{lo}, {hi}]",
                "def {name}(xs):\n    return [min(max(x, %d), %d) for x in xs]\n" % (lo, hi),
                lambda xs: [lo if v < lo else hi if v > hi else v for v in xs], [(_ints(rng),) for _ in range(5)])


def reverse_words(rng) -> Task:
    return Task("reverse_words", "s", "returns the words of the string `s` in reverse order, joined by single spaces",
                "def {name}(s):\n    return ' '.join(s.split()[::-1])\n",
                lambda s: " ".join(reversed(s.split())), [(_words(rng),) for _ in range(5)])


def count_char(rng) -> Task:
    ch = rng.choice("aeiout")
    return Task(f"count_{ch}", "s", f"returns how many times the letter '{ch}' occurs in the string `s`",
                "def {name}(s):\n    return s.count(%r)\n" % ch,
                lambda s: sum(1 for c in s if c == ch), [(_words(rng),) for _ in range(5)])


def fibonacci_like(rng) -> Task:
    a, b = rng.randint(0, 3), rng.randint(1, 4)

    def spec(n):
        seq = [a, b]
        while len(seq) <= n:
            seq.append(seq[-1] + seq[-2])
        return seq[n]
    return Task("sequence_term", "n",
                f"returns term `n` (0-based) of the sequence that starts {a}, {b} and where each later term is the sum of the two before it",
                "def {name}(n):\n    x, y = %d, %d\n    for _ in range(n):\n        x, y = y, x + y\n    return x\n" % (a, b),
                spec, [(rng.randint(0, 25),) for _ in range(5)])


def is_palindrome(rng) -> Task:
    def sample():
        w = "".join(rng.choice("abcAB") for _ in range(rng.randint(0, 5)))
        return w + w[::-1][rng.randint(0, 1):] if rng.random() < 0.6 else w
    return Task("is_palindrome", "s", "returns True if the string `s` reads the same backwards, ignoring letter case",
                "def {name}(s):\n    t = s.lower()\n    return t == t[::-1]\n",
                lambda s: all(s[i].lower() == s[-1 - i].lower() for i in range(len(s))), [(sample(),) for _ in range(6)])


def digit_sum(rng) -> Task:
    return Task("digit_sum", "n", "returns the sum of the decimal digits of the integer `n` (ignoring its sign)",
                "def {name}(n):\n    n = abs(n)\n    total = 0\n    while n:\n        total += n % 10\n        n //= 10\n    return total\n",
                lambda n: sum(int(c) for c in str(abs(n))), [(rng.randint(-10 ** 6, 10 ** 6),) for _ in range(5)])


def running_max(rng) -> Task:
    def spec(xs):
        return [max(xs[:i + 1]) for i in range(len(xs))]
    return Task("running_max", "xs", "returns the list whose i-th element is the largest of xs[0..i]",
                "def {name}(xs):\n    out = []\n    for x in xs:\n        out.append(x if not out else max(out[-1], x))\n    return out\n",
                spec, [(_ints(rng),) for _ in range(5)])


def caesar(rng) -> Task:
    k = rng.randint(1, 25)
    return Task("shift_letters", "s",
                f"shifts every lowercase letter of `s` {k} places forward in the alphabet (wrapping from z to a) and leaves other characters unchanged",
                "def {name}(s):\n    return ''.join(chr((ord(c) - 97 + %d) %% 26 + 97) if 'a' <= c <= 'z' else c for c in s)\n" % k,
                lambda s: s.translate(str.maketrans("abcdefghijklmnopqrstuvwxyz",
                                                    "abcdefghijklmnopqrstuvwxyz"[k:] + "abcdefghijklmnopqrstuvwxyz"[:k])),
                [(_words(rng) + rng.choice(["!", " 42", ""]),) for _ in range(5)])


def polynomial(rng) -> Task:
    a, b, c = rng.randint(-5, 5), rng.randint(-9, 9), rng.randint(-9, 9)
    return Task("poly", "x", f"returns {a}*x**2 + {b}*x + {c} for the integer `x`",
                "def {name}(x):\n    return (%d * x + %d) * x + %d\n" % (a, b, c),
                lambda x: a * x * x + b * x + c, [(rng.randint(-50, 50),) for _ in range(5)])


TEMPLATES: Dict[str, Callable[[random.Random], Task]] = {
    f.__name__: f for f in (count_greater, clamp_all, reverse_words, count_char, fibonacci_like, is_palindrome,
                            digit_sum, running_max, caesar, polynomial)}


def make_task(index: int, seed: int) -> Tuple[str, Task]:
    """Task `index` of a corpus: template chosen and filled from random.Random(f"{seed}:{index}")."""
    rng = random.Random(f"{seed}:code:{index}")
    kind = rng.choice(sorted(TEMPLATES))
    task = TEMPLATES[kind](rng)
    task.solution = task.solution.replace("{name}", task.name)
    return kind, task


def prompt_of(task: Task) -> str:
    return f"Write a Python function `{task.name}({task.signature})` that {task.description}."


def generate(n: int, seed: int, timeout_s: float = 5.0) -> Iterator[dict]:
    """Yield up to n records whose solution passes its generated tests in the sandbox."""
    for index in range(n):
        kind, task = make_task(index, seed)
        tests = task.tests()
        result = run_code_tests(task.solution, tests, timeout_s=timeout_s, memory_mb=256)
        if not result.all_passed:
            continue
        text = (f"{prompt_of(task)}\n\n```python\n{task.solution}```\n\nTests:\n```python\n"
                + "\n".join(tests) + "\n```")
        yield make_record(text, "code", kind, "programmatic", f"data_prep.synth.code_gen:{kind}", seed, index,
                          prompt=prompt_of(task), solution=task.solution, tests=tests, entry_point=task.name)
