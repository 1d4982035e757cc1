"""Continued pretraining (math / code CPT, long-context extension) on the one training loop.

    python -m posttrain.cpt stage=cpt_math checkpoint.load=BASE checkpoint.weights_only=true \\
        'data.paths=[general,math_web,math_synth]' [key=value ...]

What differs from pretraining is data and starting point, not the loop:
- `checkpoint.load` names an HF-converted model (`tools.convert hf-to-mcore`) or a training
  checkpoint, loaded as weights only: the optimizer and LR schedule start fresh, so
  `train.warmup_steps` re-warms the LR from 0 before it decays to `train.min_lr`.
- `cpt.mixture_steps` / `cpt.mixture_weights` change the blend at given steps (e.g. more
  math later in the run). Sample s of the global stream belongs to step s // global_batch_size
  and is drawn from the dataset whose share in that step's phase is furthest behind its weight,
  so every step's batch follows its phase's weights exactly, for any DP/PP layout, and a resumed
  run sees the same sequence. Validation mixes the paths' validation splits with the last
  phase's weights.
- RoPE scaling (YaRN, `model.rope_scaling_type`) is applied to each model chunk as it is built.
- `cpt.document_mask=true` (long context): each micro-batch's EOD-separated documents are
  packed into one thd sequence (`pack_documents`), so attention never crosses a document and
  RoPE positions restart per document; works with context parallelism.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from functools import partial
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ext import data
from megatron_ext.cli import override_key, override_value
from megatron_ext.config import Config, ConfigError
from megatron_ext.pretrain import PretrainStage, masked_token_loss

log = logging.getLogger(__name__)


def mixture_plan(phases: Sequence[Tuple[int, Sequence[float]]], global_batch_size: int,
                 total_samples: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset id, index within that dataset) for each global sample under a phase schedule.

    Within a phase, each sample goes to the dataset with the largest deficit
    weight * drawn_in_phase - drawn_from_it_in_phase (Megatron's blending rule), so the realised
    shares track the weights at every prefix of the phase.
    """
    n_sets = len(phases[0][1])
    which = np.zeros(total_samples, dtype=np.int64)
    index = np.zeros(total_samples, dtype=np.int64)
    used = np.zeros(n_sets, dtype=np.int64)
    starts = [step * global_batch_size for step, _ in phases] + [total_samples]
    for (step, weights), begin, end in zip(phases, starts, starts[1:]):
        w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        drawn = np.zeros(n_sets, dtype=np.int64)
        for s in range(begin, min(end, total_samples)):
            k = int(np.argmax(w * (s - begin + 1) - drawn))
            which[s], index[s] = k, used[k]
            drawn[k] += 1
            used[k] += 1
    return which, index


class MixtureDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets by a precomputed plan (see `mixture_plan`)."""

    def __init__(self, datasets: List, which: np.ndarray, index: np.ndarray):
        self.datasets, self.which, self.index = datasets, which, index

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> dict:
        ds = self.datasets[self.which[i]]
        return ds[int(self.index[i]) % len(ds)]

    def share(self, begin: int, end: int) -> np.ndarray:
        """Fraction of samples [begin, end) drawn from each dataset (for logs and tests)."""
        counts = np.bincount(self.which[begin:end], minlength=len(self.datasets))
        return counts / max(1, end - begin)


def _single_path_cfg(cfg: Config, path: str) -> Config:
    d = dataclasses.replace(cfg.data, paths=[path], weights=None, blend_file=None)
    return dataclasses.replace(cfg, data=d, cpt=CPTOptions())


def scheduled_datasets(cfg: Config, train_samples: int, valid_samples: int):
    """Train: the scheduled mixture; valid: the paths' validation splits at the last phase's weights."""
    d, gbs = cfg.data, cfg.train.global_batch_size
    phases = list(zip(cfg.cpt.mixture_steps, cfg.cpt.mixture_weights))
    which, index = mixture_plan(phases, gbs, train_samples)
    v_which, v_index = mixture_plan([(0, phases[-1][1])], gbs, max(valid_samples, 0))
    train_sets, valid_sets = [], []
    for k, path in enumerate(d.paths):
        n_train = max(1, int((which == k).sum()))
        n_valid = max(1, int((v_which == k).sum())) if valid_samples else 0
        tr, va = data.build_datasets(_single_path_cfg(cfg, path), n_train, n_valid)
        if tr is None:
            raise ValueError(f"data.paths[{k}]={path}: no training split (data.split={d.split})")
        train_sets.append(tr)
        valid_sets.append(va)
    for (step, weights) in phases:
        # One entry per data.paths entry: a path listed twice is two entries of the mixture.
        log.info("data mixture from step %d: %s", step, ", ".join(f"[{k}] {p}={w:g}" for k, (p, w) in
                                                                 enumerate(zip(d.paths, weights))))
    train = MixtureDataset(train_sets, which, index)
    valid = None
    if valid_samples and all(v is not None for v in valid_sets):
        valid = MixtureDataset(valid_sets, v_which, v_index)
    return train, valid


def pack_documents(batch: dict, eod: int, multiple: int) -> Tuple[dict, torch.Tensor]:
    """[b, s] GPT micro-batch -> one packed [1, T] sequence of its documents + cu_seqlens.

    Documents end after each EOD token (and at each sample's end). The EOD token's label is the
    next document's first token, which a document-masked model cannot see: its loss is masked.
    Each document is padded with EOD tokens (loss-masked) to a multiple of `multiple` (2*CP).
    """
    pieces = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    bounds = [0]
    for row in range(batch["tokens"].shape[0]):
        tokens = batch["tokens"][row]
        ends = (tokens == eod).nonzero().squeeze(-1).tolist()
        cuts = sorted({e + 1 for e in ends if e + 1 < len(tokens)} | {len(tokens)})
        start = 0
        for end in cuts:
            length = end - start
            pad = -length % multiple
            mask = batch["loss_mask"][row, start:end].clone().float()
            if tokens[end - 1] == eod:
                mask[-1] = 0.0
            fill = torch.full((pad,), eod, dtype=tokens.dtype)
            pieces["tokens"].append(torch.cat([tokens[start:end], fill]))
            pieces["labels"].append(torch.cat([batch["labels"][row, start:end], fill]))
            pieces["loss_mask"].append(torch.cat([mask, torch.zeros(pad)]))
            pieces["position_ids"].append(torch.arange(length + pad))
            bounds.append(bounds[-1] + length + pad)
            start = end
    packed = {k: torch.cat(v).unsqueeze(0) for k, v in pieces.items()}
    return packed, torch.tensor(bounds, dtype=torch.int32)


@dataclass
class CPTOptions:
    """The `cpt` section: what continued pretraining adds to the pretraining keys."""

    mixture_steps: List[int] = field(default_factory=list)
    """Data-mixture schedule: the optimizer steps (0-based, first must be 0) at which the blend
    weights change. Empty: no schedule (`data.weights` throughout)."""
    mixture_weights: List[List[float]] = field(default_factory=list)
    """One weight list per `mixture_steps` entry, one weight per `data.paths` entry: step s
    draws its samples with the weights of the last entry whose step is <= s."""
    document_mask: bool = False
    """Attention never crosses documents: each sample's EOD-separated documents become one
    packed (thd) sequence with positions restarting per document (padded to 2*CP multiples).
    Needs parallel.pp=1 (packed lengths vary per micro-batch)."""


def option_errors(cfg: Config) -> List[str]:
    """What is wrong with the `cpt` section of a job (empty when it is fine)."""
    c, d, errors = cfg.cpt, cfg.data, []
    if c.mixture_steps or c.mixture_weights:
        steps = list(c.mixture_steps)
        if len(steps) != len(c.mixture_weights):
            errors.append(f"cpt.mixture_steps has {len(steps)} entries but cpt.mixture_weights has "
                          f"{len(c.mixture_weights)}")
        if not (steps and steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:]))):
            errors.append(f"cpt.mixture_steps={steps} must start at 0 and increase")
        if d.blend_file or not d.paths:
            errors.append("cpt.mixture_steps needs explicit data.paths (one weight per path)"
                          + (f", not data.blend_file={d.blend_file}" if d.blend_file else ""))
        for i, w in enumerate(c.mixture_weights):
            if not (len(w) == len(d.paths) and all(x >= 0 for x in w) and sum(w) > 0):
                errors.append(f"cpt.mixture_weights[{i}]={list(w)} needs {len(d.paths)} non-negative weights "
                              "(one per data.paths entry) with a positive sum")
    if c.document_mask and cfg.parallel.pp != 1:
        errors.append(f"cpt.document_mask=true needs parallel.pp=1 (got {cfg.parallel.pp}): packed lengths vary")
    if c.document_mask and cfg.train.cuda_graph:
        errors.append("train.cuda_graph=true needs fixed shapes: cpt.document_mask=false (got True)")
    return errors


def document_masked(cfg: Config) -> bool:
    """The job packs documents (`cpt.document_mask`, only in a CPT stage's config)."""
    return bool(getattr(getattr(cfg, "cpt", None), "document_mask", False))


class CPTStage(PretrainStage):
    """Next-token prediction with a scheduled data mixture, RoPE scaling and document masking."""

    entry, config_section, config_options = "posttrain.cpt", "cpt", CPTOptions
    help_keys = ("model.rope_scaling_type", "model.rope_scaling_factor", "model.rope_original_max_position_embeddings")

    def __init__(self, cfg: Optional[Config] = None):
        super().__init__(cfg)
        errors = option_errors(cfg) if cfg is not None else []
        if errors:
            raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
        self._packing: Optional[Tuple[int, int]] = None  # (eod id, length multiple) when masking

    def forward_step(self, data_iterator, model):
        if self._packing is None:
            return super().forward_step(data_iterator, model)
        eod, multiple = self._packing
        packed, cu = pack_documents(next(data_iterator), eod, multiple)
        batch = data.packed_on_this_rank(packed, cu)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"],
                       packed_seq_params=data.packed_seq_params(cu))
        return output, partial(masked_token_loss, batch["loss_mask"])

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        if cfg.cpt.document_mask:
            from data_prep.tokenizer import get_tokenizer

            self._packing = (get_tokenizer(cfg.data.tokenizer).eod, 2 * cfg.parallel.cp)
        if cfg.cpt.mixture_steps:
            return scheduled_datasets(cfg, train_samples, valid_samples)
        return data.build_datasets(cfg, train_samples, valid_samples)


DEFAULT_STAGE = "cpt_math"


def stage_overrides(overrides: Sequence[str], default: str = DEFAULT_STAGE) -> List[str]:
    """Select a stage config group (`stage=X` or `+stage=X`; default cpt_math) plus the rest."""
    rest = [o for o in overrides if override_key(o) != "stage"]
    return [f"stage={override_value(overrides, 'stage') or default}", *rest]


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m posttrain.cpt [stage=cpt_math|cpt_code|long_context] [key=value ...]`."""
    from megatron_ext.train import run

    args = list(sys.argv[1:] if argv is None else argv)
    return run(stage_overrides(args), name=DEFAULT_STAGE, base_overrides=[f"stage={DEFAULT_STAGE}"])


if __name__ == "__main__":
    sys.exit(main())
