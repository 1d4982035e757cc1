"""Process reward model: a binary correctness score at the separator token that ends each step.

`python -m posttrain.prm [k=v ...]` trains on `posttrain.data_path` (jsonl rows with
"problem", "steps" and "step_labels" (1 correct, 0 wrong; steps after the first error are
unlabelled), or instead of "step_labels" ProcessBench's "label" (the earliest wrong step, or -1
when all are correct), read as step labels 1, ..., 1, 0 up to that step) or on generated
step-by-step sums. A row with neither, or with malformed ones, is an error naming file:line.
The prompt is the ChatML user turn; each step is encoded as `step + "\\n\\n"`, and the last
token of that (the separator) carries the step's label. Loss: binary cross entropy on the
value head's logit at each labelled separator, summed and normalised by the global count of
labelled steps.

Evaluation (the loop's validation) runs on the bundled ProcessBench-format sample
(`posttrain/data/processbench_sample.jsonl`: "problem", "steps", "label" = earliest wrong step
or -1): the predicted label is the first step whose P(correct) <= 0.5, or -1 (a step is correct
only above 0.5: ProcessBench's script takes the argmax of the (wrong, correct) logits, and a tie
is "wrong"). As ProcessBench defines it, accuracy is taken separately on the erroneous and the
all-correct subsets and the reported F1 is their harmonic mean; over several splits, the
benchmark's score is the mean of the splits' F1 (`posttrain.evals.metrics.processbench_mean_f1`).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from typing import List, Sequence

import torch
import torch.nn.functional as F

from data_prep.chat import encode_chat
from data_prep.tokenizer import get_tokenizer
from megatron_ext import data
from megatron_ext.config import Config
from megatron_ext.schedule import report
from megatron_ext.stages import LOSS, Stage, require
from posttrain import synthetic
from posttrain.datasets import DATA_DIR, Cycled, pad_to, read_jsonl_lines
from posttrain.rm import add_value_head

SAMPLE = DATA_DIR / "processbench_sample.jsonl"
SEPARATOR = "\n\n"


def step_labels(row: dict, where: str) -> List[int]:
    """A row's per-step labels: "step_labels", else from ProcessBench's "label" (correct up to the
    earliest error, which is wrong; -1: all correct). Errors name `where` (file:line)."""
    steps = row.get("steps")
    if not isinstance(row.get("problem"), str) or not isinstance(steps, list) or not steps \
            or not all(isinstance(x, str) for x in steps):
        raise ValueError(f"{where}: a PRM row needs a string 'problem' and a non-empty list of string 'steps'")
    labels = row.get("step_labels")
    if labels is None:
        if row.get("label") is None:
            raise ValueError(f"{where}: the row has neither 'step_labels' (0/1 per step) nor a ProcessBench "
                             "'label' (index of the earliest wrong step, -1 if none)")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
            raise ValueError(f"{where}: 'label'={label!r} must be an integer in [-1, {len(steps) - 1}] "
                             f"(the earliest wrong step of {len(steps)}, -1 if none)")
        return [1] * len(steps) if label < 0 else [1] * label + [0]
    if not isinstance(labels, list) or len(labels) > len(steps) \
            or any(isinstance(x, bool) or x not in (0, 1) for x in labels):
        raise ValueError(f"{where}: 'step_labels' must be a list of at most {len(steps)} (the number of steps) "
                         f"0/1 values, got {labels!r}")
    return labels


def step_item(tokenizer, row: dict, seq_length: int, where: str, processbench: bool = True) -> dict:
    """Token ids of a solution with per-position step labels, label mask and (when
    `processbench`) the row's ProcessBench label for the evaluation metrics."""
    labels_in = step_labels(row, where)
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": row["problem"]}], add_generation_prompt=True)
    positions = []
    for step in row["steps"]:
        ids = ids + tokenizer.encode(step + SEPARATOR)
        positions.append(len(ids) - 1)
    step_label = torch.zeros(seq_length)
    step_mask = torch.zeros(seq_length)
    step_pos = torch.full((seq_length,), -1)
    for k, pos in enumerate(positions):
        if pos < seq_length:
            step_pos[k] = pos
        if k < len(labels_in) and pos < seq_length:
            step_label[pos], step_mask[pos] = float(labels_in[k]), 1.0
    return {"tokens": torch.tensor(pad_to(ids, seq_length, tokenizer.pad, where)),
            "position_ids": torch.arange(seq_length), "step_label": step_label, "step_mask": step_mask,
            "step_pos": step_pos, "pb_label": torch.tensor(int(row.get("label", -2)) if processbench else -2)}


def earliest_error(probs: Sequence[float], threshold: float = 0.5) -> int:
    """ProcessBench prediction: index of the first step judged wrong, or -1 if none is.

    A step is correct only when P(correct) > threshold: ProcessBench's evaluation takes
    argmax over the (wrong, correct) logits, which picks "wrong" on a tie (P = 0.5)."""
    return next((k for k, p in enumerate(probs) if not p > threshold), -1)


def processbench_f1(error_acc: float, correct_acc: float) -> float:
    """Harmonic mean of the accuracies on the erroneous and the all-correct subsets."""
    return 0.0 if error_acc + correct_acc == 0 else 2 * error_acc * correct_acc / (error_acc + correct_acc)


def prm_loss(batch: dict, output: torch.Tensor):
    """BCE at labelled separators; ProcessBench subset hits for rows that carry a label."""
    logits = output.squeeze(-1).float()
    mask = batch["step_mask"]
    bce = F.binary_cross_entropy_with_logits(logits, batch["step_label"], reduction="none") * mask
    n = mask.sum()
    pairs = {LOSS: (bce.sum(), n),
             "step_accuracy": ((((logits > 0).float() == batch["step_label"]).float() * mask).sum(), n)}
    err_hits = ok_hits = n_err = n_ok = 0
    for b in range(logits.shape[0]):
        label = int(batch["pb_label"][b])
        if label == -2:  # training rows have no ProcessBench label
            continue
        pos = [int(p) for p in batch["step_pos"][b] if p >= 0]
        pred = earliest_error(torch.sigmoid(logits[b, pos]).tolist())
        if label >= 0:
            err_hits, n_err = err_hits + (pred == label), n_err + 1
        else:
            ok_hits, n_ok = ok_hits + (pred == -1), n_ok + 1
    if n_err + n_ok:
        pairs["error_subset_acc"] = (torch.tensor(float(err_hits)), n_err)
        pairs["correct_subset_acc"] = (torch.tensor(float(ok_hits)), n_ok)
    rep = report(pairs)
    return bce.sum(), n.to(torch.int), rep


def _with_f1(means: dict) -> dict:
    err, ok = means.get("error_subset_acc"), means.get("correct_subset_acc")
    if err is not None and ok is not None and not (math.isnan(err) or math.isnan(ok)):
        means["processbench_f1"] = processbench_f1(err, ok)
    return means


class PRMStage(Stage):
    """Process reward model on the one training loop."""

    entry, loss_name = "posttrain.prm", "prm_loss"  # the loss: per-step BCE
    help_keys = ("posttrain.data_path", "posttrain.num_samples", "posttrain.task_seed")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        require(cfg, "prm")

    customize_model = staticmethod(add_value_head)
    derive_metrics = staticmethod(_with_f1)
    """The loop's hook: ProcessBench F1 from the reduced subset accuracies."""

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        tok = get_tokenizer(cfg.data.tokenizer)
        p = cfg.posttrain
        if p.data_path:
            rows = [(f"{p.data_path}:{line}", r) for line, r in read_jsonl_lines(p.data_path)]
        else:
            rows = [(f"synthetic step task row {i}", r)
                    for i, r in enumerate(synthetic.step_rows(p.num_samples, p.task_seed))]
        if not rows:
            raise ValueError(f"{p.data_path}: no rows")
        # Training rows report no ProcessBench metrics: those are the validation sample's.
        train = Cycled([step_item(tok, r, cfg.data.seq_length, where, processbench=False) for where, r in rows],
                       train_samples, cfg.train.seed)
        valid = Cycled([step_item(tok, r, cfg.data.seq_length, f"{SAMPLE}:{line}")
                        for line, r in read_jsonl_lines(SAMPLE)], valid_samples, cfg.train.seed)
        return train, (valid if valid_samples else None)

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        return output, partial(prm_loss, batch)


if __name__ == "__main__":
    from megatron_ext.train import run_stage

    sys.exit(run_stage("prm"))
