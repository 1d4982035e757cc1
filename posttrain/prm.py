"""Process reward model: a binary correctness score at the separator token that ends each step.

`python -m posttrain.prm [k=v ...]` trains on `posttrain.data_path` (jsonl rows with
"problem", "steps" and "step_labels" (1 correct, 0 wrong; steps after the first error are
unlabelled)) or on generated step-by-step sums. The prompt is the ChatML user turn; each step
is encoded as `step + "\\n\\n"`, and the last token of that (the separator) carries the step's
label. Loss: binary cross entropy on the value head's logit at each labelled separator, summed
and normalised by the global count of labelled steps.

Evaluation (the loop's validation) runs on the bundled ProcessBench-format sample
(`posttrain/data/processbench_sample.jsonl`: "problem", "steps", "label" = earliest wrong step
or -1): the predicted label is the first step whose P(correct) < 0.5, or -1. As ProcessBench
defines it, accuracy is taken separately on the erroneous and the all-correct subsets and the
reported F1 is their harmonic mean.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import List, Sequence

import torch
import torch.nn.functional as F

from data_prep.chat import encode_chat
from data_prep.tokenizer import get_tokenizer
from megatron_ext import data
from megatron_ext.config import Config
from posttrain import synthetic
from posttrain.common import DATA_DIR, Cycled, StageMetrics, pad_to, read_jsonl, report, require, run_cli
from posttrain.rm import add_value_head

SAMPLE = DATA_DIR / "processbench_sample.jsonl"
SEPARATOR = "\n\n"


def step_item(tokenizer, row: dict, seq_length: int, where: str) -> dict:
    """Token ids of a solution with per-position step labels, label mask and the row's label."""
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": row["problem"]}], add_generation_prompt=True)
    labels_in = row.get("step_labels")
    if labels_in is None and "label" in row:  # ProcessBench: correct up to the earliest error, which is wrong
        label = int(row["label"])
        labels_in = [1] * len(row["steps"]) if label < 0 else [1] * label + [0]
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
            "step_pos": step_pos, "pb_label": torch.tensor(int(row.get("label", -2)))}


def earliest_error(probs: Sequence[float], threshold: float = 0.5) -> int:
    """ProcessBench prediction: index of the first step judged wrong, or -1 if none is."""
    return next((k for k, p in enumerate(probs) if p < threshold), -1)


def processbench_f1(error_acc: float, correct_acc: float) -> float:
    """Harmonic mean of the accuracies on the erroneous and the all-correct subsets."""
    return 0.0 if error_acc + correct_acc == 0 else 2 * error_acc * correct_acc / (error_acc + correct_acc)


def prm_loss(batch: dict, metrics: StageMetrics, output: torch.Tensor):
    """BCE at labelled separators; ProcessBench subset hits for rows that carry a label."""
    logits = output.squeeze(-1).float()
    mask = batch["step_mask"]
    bce = F.binary_cross_entropy_with_logits(logits, batch["step_label"], reduction="none") * mask
    n = mask.sum()
    pairs = {"lm loss": (bce.sum(), n),
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
    metrics.add(rep)
    return bce.sum(), n.to(torch.int), rep


def _with_f1(means: dict) -> dict:
    if "error_subset_acc" in means:
        means["processbench_f1"] = processbench_f1(means["error_subset_acc"], means["correct_subset_acc"])
    return means


class PRMStage:
    """Process reward model on the one training loop."""

    def __init__(self, cfg: Config):
        require(cfg, "prm")
        self.metrics = StageMetrics(cfg, derive=_with_f1)

    customize_model = staticmethod(add_value_head)

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        tok = get_tokenizer(cfg.data.tokenizer)
        p = cfg.posttrain
        rows = read_jsonl(p.data_path) if p.data_path else synthetic.step_rows(p.num_samples, p.task_seed)
        train_rows: List[dict] = [{k: v for k, v in r.items() if k != "label"} for r in rows]
        where = p.data_path or "synthetic step task"
        train = Cycled([step_item(tok, r, cfg.data.seq_length, where) for r in train_rows], train_samples,
                       cfg.train.seed)
        valid = Cycled([step_item(tok, r, cfg.data.seq_length, str(SAMPLE)) for r in read_jsonl(SAMPLE)],
                       valid_samples, cfg.train.seed)
        return train, (valid if valid_samples else None)

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        return output, partial(prm_loss, batch, self.metrics)


if __name__ == "__main__":
    sys.exit(run_cli("prm", PRMStage))
