"""Small synthetic tasks for the post-training stages, deterministic from a seed.

- `chat_rows`: arithmetic chat conversations (SFT).
- `preference_rows`: a learnable preference task: the preferred reply uses mostly words from
  one list and the other reply mostly from a second list, in random order and length, so a
  model must learn which words make a reply better (held-out pairs are new combinations).
- `step_rows`: step-by-step arithmetic solutions, some with an injected wrong step, labelled
  per step and with the earliest wrong step (PRM training data and the ProcessBench format).
- `arithmetic_prompts`: one-digit sums for GRPO, answered as a number; `arithmetic_chat_rows`:
  the same sums as SFT conversations (a warm start, so that GRPO's first rollouts earn rewards).

`python -m posttrain.synthetic` rewrites the bundled samples under `posttrain/data/`.
"""

from __future__ import annotations

import json
import random
from typing import Dict, List

from posttrain.datasets import DATA_DIR

GOOD = ["great", "clear", "helpful", "kind", "correct", "precise", "thanks", "good", "useful", "calm"]
BAD = ["wrong", "rude", "vague", "bad", "lazy", "messy", "useless", "false", "late", "boring"]
TOPICS = ["cats", "rain", "music", "trains", "bread", "rivers", "chess", "maps", "tea", "stars"]


def chat_rows(n: int, seed: int) -> List[dict]:
    """Conversations {"messages": [...]} with a system turn and one or two Q/A rounds."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a careful calculator."}]
        for _ in range(rng.randint(1, 2)):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            messages.append({"role": "user", "content": f"What is {a} + {b}?"})
            messages.append({"role": "assistant", "content": f"{a} + {b} = {a + b}."})
        rows.append({"messages": messages})
    return rows


def _reply(rng: random.Random, major: List[str], minor: List[str]) -> str:
    k = rng.randint(3, 6)
    words = [rng.choice(major) for _ in range(k)] + [rng.choice(minor) for _ in range(rng.randint(0, k // 3))]
    rng.shuffle(words)
    return " ".join(words)


def preference_rows(n: int, seed: int) -> List[dict]:
    """Rows {"prompt", "chosen", "rejected"} of the synthetic preference task."""
    rng = random.Random(seed)
    return [{"prompt": f"Tell me about {rng.choice(TOPICS)}.",
             "chosen": _reply(rng, GOOD, BAD), "rejected": _reply(rng, BAD, GOOD)} for _ in range(n)]


def step_rows(n: int, seed: int) -> List[Dict]:
    """ProcessBench-format rows: a running sum in steps; about half have one wrong step.

    Each row: {"id", "problem", "steps", "label"} with label = index of the earliest wrong step
    or -1, plus "step_labels" (1 correct / 0 wrong) up to and including the first error.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        nums = [rng.randint(1, 9) for _ in range(rng.randint(3, 5))]
        total, steps, label = nums[0], [], -1
        wrong_at = rng.randrange(len(nums) - 1) if rng.random() < 0.5 else None
        for j, x in enumerate(nums[1:]):
            new = total + x
            if j == wrong_at:
                new += rng.choice([-2, -1, 1, 2])  # wrong arithmetic; later steps stay consistent with it
                label = j
            steps.append(f"{total} + {x} = {new}")
            total = new
        n_labelled = len(steps) if label < 0 else label + 1
        rows.append({"id": f"sum-{seed}-{i}", "problem": "Add: " + " + ".join(map(str, nums)),
                     "steps": steps, "label": label,
                     "step_labels": [1] * (n_labelled - 1) + [0 if label >= 0 else 1],
                     "final_answer_correct": label < 0})
    return rows


def arithmetic_prompts(n: int, seed: int, max_operand: int = 4) -> List[dict]:
    """Rows {"prompt", "answer"} of sums of two integers in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def arithmetic_chat_rows(n: int, seed: int, max_operand: int = 4) -> List[dict]:
    """The same sums as SFT conversations (user: "a+b=", assistant: the sum), to warm-start GRPO."""
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in arithmetic_prompts(n, seed, max_operand)]


def write_samples() -> None:
    """Regenerate the bundled sample files."""
    DATA_DIR.mkdir(exist_ok=True)
    for name, rows in (("sft_sample.jsonl", chat_rows(64, 1)),
                       ("processbench_sample.jsonl", step_rows(40, 7)),
                       ("arithmetic_sft.jsonl", arithmetic_chat_rows(400, 3))):
        with open(DATA_DIR / name, "w", encoding="utf-8") as f:
            for row in rows:
                if "step_labels" in row:
                    row = {k: v for k, v in row.items() if k != "step_labels"}  # eval data: answers only
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_samples()
