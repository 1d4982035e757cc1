"""DPO, IPO and SimPO on preference pairs, with reference log-probs precomputed in the run.

`python -m posttrain.dpo [dpo.loss=sigmoid|ipo|simpo] [k=v ...]`. Before training,
the frozen reference model (see `posttrain.reference`) scores every reply once through the
pipeline; each sample carries its reference log-prob, so training needs no second model in
memory and works at any TP/PP layout. With pi/ref the summed reply log-probs, |c|/|r| the
reply lengths in tokens, h = (pi_c - ref_c) - (pi_r - ref_r) and
h_avg = (pi_c - ref_c) / |c| - (pi_r - ref_r) / |r|:

  sigmoid (DPO): -log sigmoid(beta * h)
  ipo:           (h_avg - 1 / (2 beta))^2   (TRL's form: log-ratios averaged per token, as the
                                              IPO authors use it; beta is comparable with TRL's)
  ipo_sum:       (h - 1 / (2 beta))^2       (token-summed log-ratios: a larger beta fits longer replies)
  simpo:         -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)   (no reference)

Reported: loss, reward accuracy, and the chosen/rejected implicit rewards and their margin.
The implicit rewards are beta times the summed log-ratios, beta * (pi - ref), for every loss
but simpo (beta times the per-token policy log-prob, the quantity its loss compares): for ipo
too, as TRL's DPOTrainer logs rewards/chosen, rewards/margins and rewards/accuracies, although
its loss compares per-token ratios. ipo also reports the per-token ones its loss uses, under
`chosen_reward_normalized`, `rejected_reward_normalized`, `margin_normalized` and
`accuracy_normalized` (beta * (pi - ref) / length); on the same model the two accuracies can
differ, and the margins can have opposite signs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial
import torch

from megatron_ext import data
from megatron_ext.config import Config, ConfigError
from megatron_ext.schedule import report
from megatron_ext.stages import LOSS, Stage, require
from posttrain.logprobs import token_logps
from posttrain.losses import PREFERENCE_LOSSES, lookup
from megatron_ext.forward import forward_only
from posttrain.reference import Reference
from posttrain.rm import preference_datasets


def sequence_logps(output: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each reply: output is [b, s] token log-probs."""
    return (output.float() * loss_mask).sum(-1)


def preference_loss(kind: str, beta: float, gamma: float, pi: torch.Tensor, ref: torch.Tensor,
                    lengths: torch.Tensor):
    """Per-pair losses and implicit rewards (chosen, rejected) from [2n] interleaved log-probs:
    the `dpo.loss` entry of `posttrain.losses.PREFERENCE_LOSSES`.

    The rewards are beta * (pi - ref) summed over the reply for sigmoid, ipo and ipo_sum (TRL's
    rewards/chosen and rewards/rejected, also for its length-normalised ipo loss); for simpo
    beta * pi / length."""
    return lookup(PREFERENCE_LOSSES, kind, "dpo.loss")(beta, gamma, pi, ref, lengths)


def preference_metrics(kind: str, rc: torch.Tensor, rr: torch.Tensor, lengths: torch.Tensor) -> dict:
    """The reported metrics as [sum over pairs, pairs]: accuracy, margin, chosen/rejected reward
    (TRL's rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected), plus for ipo
    the same four per token (`*_normalized`: each reward divided by its reply's length)."""
    n = rc.numel()
    out = {"accuracy": ((rc > rr).float().sum(), n), "margin": ((rc - rr).sum(), n),
           "chosen_reward": (rc.sum(), n), "rejected_reward": (rr.sum(), n)}
    if kind == "ipo":
        nc, nr = rc / lengths[0::2], rr / lengths[1::2]
        out.update({"accuracy_normalized": ((nc > nr).float().sum(), n), "margin_normalized": ((nc - nr).sum(), n),
                    "chosen_reward_normalized": (nc.sum(), n), "rejected_reward_normalized": (nr.sum(), n)})
    return out


def dpo_loss_func(batch: dict, p, output: torch.Tensor):
    """loss_func for the loop: sum over pairs, count = pairs, metrics as [sum, count]."""
    pi = sequence_logps(output, batch["loss_mask"])  # token log-probs from token_logps
    lengths = batch["loss_mask"].sum(-1)
    losses, rc, rr = preference_loss(p.loss, p.beta, p.simpo_gamma, pi, batch["ref_logp"], lengths)
    n = losses.numel()
    rep = report({LOSS: (losses.sum(), n), **preference_metrics(p.loss, rc, rr, lengths)})
    return losses.sum(), torch.tensor(n, dtype=torch.int), rep


@dataclass
class DPOOptions:
    """DPO's own options (the `dpo` config section)."""

    loss: str = "sigmoid"
    """`sigmoid` (DPO), `ipo` (TRL's length-normalised IPO), `ipo_sum` (IPO on summed log-probs)
    or `simpo` (reference-free)."""
    beta: float = 0.1
    """DPO/IPO/SimPO inverse temperature on the log-prob margins."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""


class DPOStage(Stage):
    """DPO / IPO / SimPO on the one training loop."""

    config_section, config_options = "dpo", DPOOptions

    entry, loss_name = "posttrain.dpo", "dpo_loss"  # the loss: DPO / IPO / SimPO
    help_keys = ("posttrain.data_path", "posttrain.num_samples", "posttrain.ref_load")

    uses_reference_model = True
    """The frozen reference is the model the run starts from (megatron_ext.stages)."""

    def __init__(self, cfg: Config):
        require(cfg, "dpo", pairs=True)
        lookup(PREFERENCE_LOSSES, cfg.dpo.loss, "dpo.loss")
        if cfg.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta={cfg.dpo.beta} must be positive")
        self.cfg = cfg
        self.reference = Reference(cfg)

    def customize_model(self, chunk, cfg: Config) -> None:
        self.reference.snapshot(chunk, cfg)

    def reference_logps(self, dataset) -> torch.Tensor:
        """Reference log-prob of each distinct item of a Cycled pair dataset, indexed like it."""
        items = dataset.items
        n = len(items)
        if self.cfg.dpo.loss == "simpo":
            return torch.zeros(n)
        bs = 2 * math.gcd(n // 2, 8)  # equal-size batches: the pipeline's p2p shape is fixed
        batches = [{k: torch.stack([it[k] for it in items[i:i + bs]]) for k in items[0]} for i in range(0, n, bs)]

        def forward(data_iterator, model):
            batch = data.on_this_rank(next(data_iterator))
            out = token_logps(model, batch["tokens"], batch["labels"])

            def loss_func(output):
                logps = sequence_logps(output, batch["loss_mask"])
                return logps.sum() * 0, torch.tensor(1, dtype=torch.int), {"logps": logps.detach().cpu()}
            return out, loss_func

        reports = forward_only(self.reference.build(), forward, batches, seq_length=self.cfg.data.seq_length,
                               micro_batch_size=bs)
        return torch.cat([r["logps"] for r in reports]) if reports else torch.zeros(n)

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        train, valid = preference_datasets(cfg, train_samples, valid_samples)
        out = []
        for ds in (train, valid):
            if ds is None:
                out.append(None)
                continue
            ref = self.reference_logps(ds)
            # Cycled maps index -> item; store the reference value on the item itself.
            ds.items = [{**it, "ref_logp": ref[i]} for i, it in enumerate(ds.items)]
            out.append(ds)
        self.reference.chunks = None  # free the reference model: training does not need it
        return out[0], out[1]

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = token_logps(model, batch["tokens"], batch["labels"])
        return output, partial(dpo_loss_func, batch, self.cfg.dpo)


if __name__ == "__main__":
    from megatron_ext.train import run_stage

    sys.exit(run_stage("dpo"))
