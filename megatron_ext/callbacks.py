"""What happens around each training step, one callback per job (like OLMo-core's callbacks).

`megatron_ext.loop.train` runs the steps; everything else a run does at a step boundary is a
`Callback` here: router statistics, throughput, the step log, validation and in-training
benchmarks, checkpointing (save interval, exit interval, preemption, final save, async commit).
Stages add their own (`Stage.callbacks`) and so can callers of `train` (a profiler, a probe).
The default ones run in the order `default_callbacks` lists them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_ext import checkpoint, fault, moe_stats, schedule, stages
from megatron_ext.build import Runtime
from megatron_ext.checkpoint import TrainState
from megatron_ext.config import Config
from megatron_ext.loggers import Loggers
from megatron_ext.stages import LOSS, Stage

Record = Dict[str, Any]


@dataclass
class Run:
    """What callbacks see: the job, its runtime, where training stands, and the logs."""

    cfg: Config
    stage: Stage
    rt: Runtime
    state: TrainState
    valid_ds: Any = None
    train_iterators: Any = None
    history: List[Record] = field(default_factory=list)
    """Per-step records of the steps run by this call, the same on every rank."""
    loggers: Optional[Loggers] = None
    stop: bool = False
    """Set by a callback to end training after this step (the exit interval)."""


class Callback:
    """Hooks around the loop, each called on every rank, in the order of the callback list."""

    def on_start(self, run: Run) -> None:
        """Once, after the model is built and resumed and the datasets exist."""

    def before_step(self, run: Run) -> None:
        """Before each optimizer step (before the stage's own `before_step`)."""

    def after_step(self, run: Run, record: Optional[Record]) -> None:
        """After each step: `record` holds its metrics, None when the step was skipped (a
        non-finite loss or gradient; `run.state.step` did not advance)."""

    def on_end(self, run: Run) -> None:
        """Once, when training stops normally (last step, or a callback's `run.stop`)."""

    def close(self, run: Run) -> None:
        """Always, last (also after an error): release files and hooks."""


class RouterStatistics(Callback):
    """MoE models: the experts' token counts of the step (a collective, also on skipped steps,
    which clears their counts) go into the record."""

    stats = None

    def on_start(self, run: Run) -> None:
        self.stats = moe_stats.for_model(run.cfg, run.rt.model)

    def after_step(self, run: Run, record: Optional[Record]) -> None:
        if self.stats is None:
            return
        stats = self.stats.collect()
        if record is not None:
            record.update(stats)

    def close(self, run: Run) -> None:
        if self.stats is not None:
            self.stats.close()


class Throughput(Callback):
    """`tokens_per_s` of each step: the global batch's tokens over the step's wall time."""

    def before_step(self, run: Run) -> None:
        self.start = time.time()

    def after_step(self, run: Run, record: Optional[Record]) -> None:
        if record is not None:
            tokens = run.cfg.train.global_batch_size * run.cfg.data.seq_length
            record["tokens_per_s"] = tokens / (time.time() - self.start)


_NOT_STAGE = {LOSS, "lr", "grad_norm", "tokens_per_s", *moe_stats.KEYS}


class StepLog(Callback):
    """The step's metrics to every sink: the loss under the stage's `loss_name`, the stage's
    own metrics, lr, grad norm, throughput, router statistics."""

    def on_start(self, run: Run) -> None:
        run.loggers = Loggers(run.cfg, run.state.step)

    def after_step(self, run: Run, record: Optional[Record]) -> None:
        if record is None:
            return
        own = {k: v for k, v in record.items() if k not in _NOT_STAGE}
        run.loggers.log_step(run.state.step, {
            run.stage.loss_name: record[LOSS], **own, "lr": record["lr"], "grad_norm": record["grad_norm"],
            "tokens/s": round(record["tokens_per_s"], 1), **dict(moe_stats.log_fields(record))})

    def close(self, run: Run) -> None:
        if run.loggers is not None:
            run.loggers.close()


class Evaluation(Callback):
    """Every `train.eval_interval` steps and at the last: the validation metrics (into the record
    as `val_*`) and the benchmark that `eval.train_hook` builds for `eval.train_tasks`."""

    def on_start(self, run: Run) -> None:
        cfg = run.cfg
        self.benchmark = (stages.resolve(cfg.eval.train_hook, "eval.train_hook")(cfg)
                          if cfg.eval.train_tasks else None)

    def after_step(self, run: Run, record: Optional[Record]) -> None:
        t, step = run.cfg.train, run.state.step
        if record is None or not t.eval_interval or not (step % t.eval_interval == 0 or step == t.steps):
            return
        if run.valid_ds is not None:
            valid = {f"val_{k}": v for k, v in schedule.evaluate(run.rt, run.stage, run.valid_ds, t.eval_iters).items()}
            record.update(valid)
            run.loggers.log_eval(step, valid)
        if self.benchmark is not None:
            run.loggers.log_eval(step, self.benchmark(run.rt))


class Checkpointing(Callback):
    """Saves every `checkpoint.save_interval` steps, at an exit interval (then stops the run),
    on a preemption signal (then raises fault.Preempted), and at the last step; commits an async
    save once every rank wrote it. The signal watcher is installed when this is constructed,
    before the (slow) model build, so an early signal is not lost."""

    def __init__(self, cfg: Config):
        self.watcher = fault.preemption_watcher()
        self.saver = checkpoint.Saver(cfg.checkpoint.async_save)

    def after_step(self, run: Run, record: Optional[Record]) -> None:
        if record is None:
            return
        cfg, step = run.cfg, run.state.step
        self.saver.finalize(blocking=False)
        if self.watcher.requested():
            if cfg.checkpoint.dir:
                self.saver.start(run.rt, run.state)
            self.saver.finalize()
            raise fault.Preempted()
        exit_every, save_every = cfg.train.exit_interval, cfg.checkpoint.save_interval
        exiting = bool(exit_every) and step % exit_every == 0
        if cfg.checkpoint.dir and (exiting or (save_every and step % save_every == 0)) and step < cfg.train.steps:
            self.saver.start(run.rt, run.state)
        run.stop = run.stop or exiting

    def on_end(self, run: Run) -> None:
        if run.cfg.checkpoint.dir and run.history and run.state.step == run.cfg.train.steps:
            self.saver.start(run.rt, run.state)
        self.saver.finalize()


def default_callbacks(cfg: Config) -> List[Callback]:
    """Every run's callbacks, in the order they run after a step."""
    return [RouterStatistics(), Throughput(), StepLog(), Evaluation(), Checkpointing(cfg)]
