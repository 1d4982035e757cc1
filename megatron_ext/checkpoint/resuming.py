"""Resuming a run: which checkpoint, and whether it may continue this config.

`resume` applies `checkpoint.load` as its `LoadPlan` says (`megatron_ext.checkpoint.plan`).
`find_resumable` picks the newest checkpoint under a root that passes `store.verify` (corrupted
ones are skipped with a warning). A full load (`load`) restores model, optimizer, scheduler, RNG
and data position, after the resume policy: the data order may not change
(`checkpoint.allow_data_change`) and the LR schedule may not change unless
`checkpoint.override_schedule` says how (`schedule_changes`). RNG states are restored only when
the parallel layout is unchanged. A weights-only load reads the model through
`sources.load_weights` and starts a fresh optimizer and schedule.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_ext.build import fuse_torch_adam
from megatron_ext.checkpoint.paths import complete_checkpoints
from megatron_ext.checkpoint.plan import LoadKind, resolve_load
from megatron_ext.checkpoint.sources import _load_state, load_weights
from megatron_ext.checkpoint.store import TrainState, _layout, _read_pointer, _set_rng_state, _sharded_state, \
    data_fingerprint, verify
from megatron_ext.safe_pickle import CheckpointError, torch_load

log = logging.getLogger(__name__)


def find_resumable(root: Path) -> Optional[tuple]:
    """Newest checkpoint under `root` that verifies, as (path, meta); corrupted ones are skipped.

    A committed `iter_N` directory may be newer than `latest` (a crash between the rename and
    the pointer update), so the pointer is only checked, never trusted over the directories.
    """
    pointed = _read_pointer(root)
    candidates = complete_checkpoints(root)
    if pointed is not None and candidates and pointed != candidates[-1]:
        log.warning("%s names %s but %s is newer; trying the newest first", root / "latest", pointed.name,
                    candidates[-1].name)
    for ckpt in reversed(candidates):
        try:
            return ckpt, verify(ckpt)
        except CheckpointError as e:
            if torch.distributed.get_rank() == 0:
                log.warning("skipping %s: %s", ckpt, e)
    return None


def _check_fingerprint(cfg, meta: dict, ckpt: Path) -> None:
    saved, now = meta["data_fingerprint"], data_fingerprint(cfg)
    changed = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in now.items() if saved.get(k) != v]
    if changed and not cfg.checkpoint.allow_data_change:
        raise CheckpointError(
            f"{ckpt}: the data order would change on resume:\n  " + "\n  ".join(changed)
            + "\nset checkpoint.allow_data_change=true to accept that")


# The keys that decide the LR / weight-decay schedule (megatron_ext.build.lr_scheduler).
SCHEDULE_KEYS = ("steps", "lr", "min_lr", "warmup_steps", "lr_schedule", "wsd_decay_steps", "weight_decay")
# Per-parameter-group copies of schedule values that the optimizer's state dict carries along.
_GROUP_SCHEDULE_FIELDS = ("max_lr", "min_lr", "start_wd", "end_wd")


def schedule_changes(cfg, meta: dict) -> List[tuple]:
    """(key, checkpoint value, config value) for every schedule key that differs between the
    checkpoint's saved config and `cfg` (wsd_decay_steps only when either side uses WSD)."""
    t = cfg.train
    saved = (meta.get("config") or {}).get("train") or {}
    changes = [(f"train.{k}", saved.get(k), getattr(t, k)) for k in SCHEDULE_KEYS if saved.get(k) != getattr(t, k)]
    if "wsd" not in (saved.get("lr_schedule"), t.lr_schedule):
        changes = [c for c in changes if c[0] != "train.wsd_decay_steps"]
    return changes


def _apply_schedule_policy(rt, ckpt: Path, meta: dict) -> bool:
    """The resume policy for the schedule keys: refuse a changed schedule (CheckpointError naming
    each key, old -> new) unless checkpoint.override_schedule=true. True: override it."""
    cfg = rt.config
    changes = schedule_changes(cfg, meta)
    step = meta["train_state"]["step"]
    listed = "\n  ".join(f"{key}: checkpoint {old!r}, config {new!r}" for key, old, new in changes)
    if changes and not cfg.checkpoint.override_schedule:
        raise CheckpointError(
            f"{ckpt}: resuming at step {step} would change the LR schedule:\n  {listed}\n"
            f"set checkpoint.override_schedule=true to apply the new schedule from step {step + 1} on, or "
            "restore these values to continue the saved one (checkpoint.weights_only=true instead starts "
            "a new schedule and optimizer from the weights)")
    if changes:
        log.warning("checkpoint.override_schedule=true: the new schedule applies from step %d on "
                    "(each step's LR is that of a fresh run of this config):\n  %s", step + 1, listed)
    elif cfg.checkpoint.override_schedule:
        log.info("checkpoint.override_schedule=true, but the schedule is unchanged: continuing it")
    else:
        log.info("resuming the saved schedule (%s)", ", ".join(f"train.{k}={getattr(cfg.train, k)}"
                                                               for k in SCHEDULE_KEYS[:5]))
    return bool(changes)


def load(rt, ckpt: Path, meta: dict, load_optimizer: bool = True) -> TrainState:
    """Load model (+ optimizer, scheduler, RNG, data position) from a verified checkpoint.

    A full load applies the resume policy for the schedule keys (`_apply_schedule_policy`)
    before any state is read."""
    if load_optimizer:
        _check_fingerprint(rt.config, meta, ckpt)
    if not load_optimizer:
        load_weights(rt.model, ckpt, rt.config.model, verified=True)
        _reload_main_params(rt)
        log.info("loaded weights from %s (fresh optimizer and schedule)", ckpt)
        return TrainState()
    override = _apply_schedule_policy(rt, ckpt, meta)
    fresh_groups = [{k: g[k] for k in _GROUP_SCHEDULE_FIELDS if k in g} for g in rt.optimizer.param_groups]
    state = _load_state(rt.model, _sharded_state(rt, is_loading=True), ckpt, StrictHandling.RAISE_ALL)
    rt.optimizer.load_state_dict(state["optimizer"])
    fuse_torch_adam(rt.optimizer)
    rt.scheduler.num_steps = 0  # load_state_dict and step *add* the saved step count
    if override:
        # The config's schedule from the saved step on: the checkpoint's step count, nothing else
        # (the optimizer's param groups also carry the old peak/min LR: put the new ones back).
        for group, fresh in zip(rt.optimizer.param_groups, fresh_groups):
            group.update(fresh)
        rt.scheduler.step(increment=meta["scheduler"]["num_steps"])
    else:
        rt.scheduler.load_state_dict(meta["scheduler"])
    if meta["layout"] == _layout():
        _restore_rng(ckpt / "rng" / f"rank_{torch.distributed.get_rank():05d}.pt")
    else:
        log.warning("layout changed %s -> %s: RNG states not restored", meta["layout"], _layout())
    state = TrainState(**meta["train_state"])
    log.info("resumed from %s at step %d (%d samples consumed)", ckpt, state.step, state.consumed_samples)
    return state


def _restore_rng(path: Path) -> None:
    state = torch_load(path)  # weights_only: tensors in dicts, as _rng_state saves them
    try:
        _set_rng_state(state)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not the RNG states of this stack ({type(e).__name__}: {e})") from None


def _reload_main_params(rt) -> None:
    """Optimizers that keep their own fp32 copy of the weights (bf16, distributed optimizer)
    made it at build time, from the random init: refresh it from the loaded weights."""
    reload = getattr(rt.optimizer, "reload_model_params", None)
    if reload is not None:
        reload()


def resume(rt) -> TrainState:
    """Apply `checkpoint.load` (its `LoadPlan`, `plan.resolve_load`): None -> fresh; `auto` ->
    newest good one in checkpoint.dir (fresh if none); a path -> exactly that checkpoint (a
    corrupted one is an error), the newest good one under a root, or a converted model's weights."""
    c = rt.config.checkpoint
    plan = resolve_load(c)
    if plan.kind is LoadKind.FRESH:
        return TrainState()
    if plan.kind is LoadKind.CONVERTED:  # `python -m tools.convert hf-to-mcore` output
        load_weights(rt.model, plan.path, rt.config.model)
        _reload_main_params(rt)
        log.info("loaded converted weights from %s (fresh optimizer and schedule)", plan.path)
        return TrainState()
    if plan.kind is LoadKind.TRAINING:
        return load(rt, plan.path, verify(plan.path), load_optimizer=not plan.weights_only)
    found = find_resumable(plan.path)
    if found is None and plan.kind is LoadKind.ROOT:
        raise CheckpointError(f"checkpoint.load={c.load}: no complete, uncorrupted checkpoint there")
    if found is None and complete_checkpoints(plan.path):
        # Restarting from scratch would silently throw the run away: fail instead.
        raise CheckpointError(f"checkpoint.load=auto: every checkpoint in {c.dir} is corrupted "
                              "(see the warnings above); remove them to start fresh")
    if found is None:
        log.info("no checkpoint in %s: starting fresh", c.dir)
        return TrainState()
    return load(rt, *found, load_optimizer=not plan.weights_only)
