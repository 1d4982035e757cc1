"""Shared by the post-training stage tests: a stage's first micro-batch on a freshly built model,
a whole training run of a stage, and a run's stage metrics from the loop's per-step records."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

LOOP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s")
"""What the loop adds to every step's record besides the stage's own metrics."""


def _config(stage: str, world_size: int, overrides: Sequence[str]):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate

    cfg = load_config([f"stage={stage}", *overrides])
    validate(cfg, world_size)
    return cfg


def stage_batch(stage: str, world_size: int, overrides: Sequence[str], samples: int = 4,
                make_stage: Optional[Callable] = None):
    """(cfg, stage object, model chunk, batch): `stage=<stage>` + overrides built at their layout
    (with the stage's customize_model), and the first training micro-batch of its dataset of
    `samples` samples, after the stage's before_step (e.g. GRPO's rollouts)."""
    from megatron_ext import data, stages
    from megatron_ext.build import build
    from megatron_ext.checkpoint import TrainState

    cfg = _config(stage, world_size, overrides)
    obj = (make_stage or stages.make)(cfg)
    rt = build(cfg, customize=obj.customize_model)
    train_ds, _ = obj.datasets(cfg, samples, 0)
    obj.before_step(rt, TrainState())
    return cfg, obj, rt.model[0], next(data.loader(train_ds, cfg))


def train_stage(stage: str, world_size: int, overrides: Sequence[str],
                make_stage: Optional[Callable] = None) -> List[Dict[str, float]]:
    """The loop's per-step records of a `stage=<stage>` + overrides run (the same on every rank)."""
    from megatron_ext import stages
    from megatron_ext.loop import train

    cfg = _config(stage, world_size, overrides)
    return train(cfg, (make_stage or stages.make)(cfg)).history


def stage_metrics(history: List[dict]) -> List[Dict[str, float]]:
    """Each step's own stage metrics (accuracy, margin, reward, kl...): the record without the
    loop's fields and the validation means."""
    return [{k: v for k, v in h.items() if k not in LOOP_FIELDS and not k.startswith("val_")} for h in history]


def valid_metrics(history: List[dict]) -> List[Dict[str, float]]:
    """The means of each evaluation (steps that ran one), `val_` removed: loss and stage metrics."""
    return [{k[4:]: v for k, v in h.items() if k.startswith("val_")} for h in history
            if any(k.startswith("val_") for k in h)]
