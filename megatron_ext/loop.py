"""The one training loop. Stages plug in a dataset and a forward_step; callbacks do the rest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_ext import checkpoint, fault, schedule
from megatron_ext.build import Runtime, build, gather_params
from megatron_ext.callbacks import Callback, Record, Run, default_callbacks
from megatron_ext.checkpoint import TrainState
from megatron_ext.config import Config
from megatron_ext.stages import Stage

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: List[Dict[str, float]]
    """Per-step metrics of the steps run by this call, the same on every rank."""
    runtime: Runtime
    state: TrainState


def train(cfg: Config, stage: Stage, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run (or resume) training up to cfg.train.steps optimizer steps; `callbacks` run after the
    default ones (`megatron_ext.callbacks.default_callbacks`) and the stage's own."""
    hooks = default_callbacks(cfg)  # first: the preemption watcher must exist before the slow build
    run = _start(cfg, stage)
    hooks += [*stage.callbacks(cfg), *callbacks]
    try:
        for hook in hooks:
            hook.on_start(run)
        while run.state.step < cfg.train.steps and not run.stop:
            for hook in hooks:
                hook.before_step(run)
            record = _train_step(run)
            for hook in hooks:
                hook.after_step(run, record)
        for hook in hooks:
            hook.on_end(run)
        gather_params(run.rt.model)  # the caller gets the trained parameters
    finally:
        for hook in hooks:
            hook.close(run)
    return TrainResult(run.history, run.rt, run.state)


def _start(cfg: Config, stage: Stage) -> Run:
    """The built (and resumed) model, the datasets sized for the whole run, the train iterators."""
    rt = build(cfg, customize=stage.customize_model)
    state = checkpoint.resume(rt)
    t = cfg.train
    valid_batches = t.eval_iters * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    train_ds, valid_ds = stage.datasets(cfg, (t.steps + t.max_skipped_steps) * t.global_batch_size,
                                        valid_batches * t.global_batch_size)
    run = Run(cfg, stage, rt, state, valid_ds)
    run.train_iterators = schedule.iterators(rt, train_ds, state.consumed_samples)
    return run


def _train_step(run: Run) -> Optional[Record]:
    """Forward/backward over the global batch and one optimizer update; the step's record, or
    None when the update was skipped (non-finite loss or gradient, within train.max_skipped_steps)."""
    rt, stage, state, t = run.rt, run.stage, run.state, run.cfg.train
    stage.before_step(rt, state)
    for chunk in rt.model:
        chunk.zero_grad_buffer()
    rt.optimizer.zero_grad()
    lr = rt.optimizer.param_groups[0]["lr"]
    reports = schedule.run_global_batch(rt, stage, run.train_iterators, forward_only=False)
    state.consumed_samples += t.global_batch_size
    problem = fault.non_finite(rt.model, reports, state.step + 1)
    if problem:
        if t.nan_policy == "stop" or state.skipped_steps >= t.max_skipped_steps:
            raise fault.NonFiniteError(f"{problem}; no parameter was updated (train.nan_policy={t.nan_policy}, "
                                       f"{state.skipped_steps} step(s) skipped before)")
        state.skipped_steps += 1
        log.warning("%s: step skipped (%d of at most %d)", problem, state.skipped_steps, t.max_skipped_steps)
        return None
    updated, grad_norm, _ = rt.optimizer.step()
    if updated:
        rt.scheduler.step(increment=1)
    state.step += 1
    record = {**schedule.stage_metrics(stage, schedule.reduce_reports(reports)), "lr": lr,
              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
    run.history.append(record)
    return record
