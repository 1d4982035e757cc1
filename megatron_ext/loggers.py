"""Where step metrics go: one sink per destination (console, jsonl file, TensorBoard, wandb),
written on rank 0. Every stage's metrics take this one path (the loop reduces them)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from megatron_ext import dist
from megatron_ext.config import Config

log = logging.getLogger("megatron_ext.train")


class Sink:
    """One destination of the step metrics; `Loggers` sends every record to each sink on rank 0."""

    def write(self, step: int, scalars: Dict[str, float], kind: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Console(Sink):
    """A line per step every `logger.log_interval` steps (and at the last), a line per evaluation."""

    def __init__(self, cfg: Config):
        self.interval, self.steps, self.start = cfg.logger.log_interval, cfg.train.steps, time.time()

    def write(self, step: int, scalars: Dict[str, float], kind: str) -> None:
        if kind == "eval":
            log.info("eval at step %d | %s", step, " | ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
            return
        if step % self.interval == 0 or step == self.steps:
            parts = [f"step {step:>6d}/{self.steps}"]
            for key, value in scalars.items():
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
            parts.append(f"elapsed {time.time() - self.start:.1f}s")
            log.info(" | ".join(parts))


class JsonLines(Sink):
    """`logger.metrics_file`: one record per step and per evaluation, full precision, appended on resume."""

    def __init__(self, path: Path, resumed_step: int):
        self.file = open_metrics_file(path, resumed_step)

    def write(self, step: int, scalars: Dict[str, float], kind: str) -> None:
        record = {"step": step, "kind": kind,
                  **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in scalars.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard(Sink):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, step: int, scalars: Dict[str, float], kind: str) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb(Sink):
    def __init__(self, cfg: Config):
        import wandb
        from omegaconf import OmegaConf

        lc = cfg.logger
        self.run = wandb.init(project=lc.wandb_project, mode=lc.wandb_mode, dir=lc.wandb_dir,
                              config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))

    def write(self, step: int, scalars: Dict[str, float], kind: str) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def sinks(cfg: Config, resumed_step: int = 0) -> List[Sink]:
    """The sinks `cfg.logger` asks for: the console always, then jsonl, TensorBoard, wandb."""
    lc = cfg.logger
    out: List[Sink] = [Console(cfg)]
    if lc.metrics_file:
        out.append(JsonLines(Path(lc.metrics_file), resumed_step))
    if lc.tensorboard_dir:
        out.append(TensorBoard(lc.tensorboard_dir))
    if lc.wandb:
        out.append(Wandb(cfg))
    return out


class Loggers:
    """Every metric of a run takes this one path: rank 0 writes each record to every sink."""

    def __init__(self, cfg: Config, resumed_step: int = 0):
        self.sinks: List[Sink] = sinks(cfg, resumed_step) if dist.is_rank0() else []

    def log_step(self, step: int, scalars: Dict[str, float]) -> None:
        for sink in self.sinks:
            sink.write(step, scalars, "train")

    def log_eval(self, step: int, scalars: Dict[str, float]) -> None:
        scalars = {k: v for k, v in scalars.items() if v is not None}  # e.g. no loss tokens
        if scalars:
            for sink in self.sinks:
                sink.write(step, scalars, "eval")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_metrics_file(path: Path, resumed_step: int):
    """The jsonl file opened for appending, without the records of steps after `resumed_step`
    (a run that died after its last checkpoint logged steps that the resumed run repeats)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            keep = [line for line in lines if _step_of(line, path) <= resumed_step]
            if len(keep) < len(lines):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(keep), encoding="utf-8")
                os.replace(tmp, path)
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise OSError(f"logger.metrics_file={path}: cannot write it ({e.strerror or e})") from None


def _step_of(line: str, path: Path) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"logger.metrics_file={path}: not a metrics file (line {line[:80]!r}); "
                         "name a new file") from None


def setup_console_logging(level: Optional[int] = None) -> None:
    """Rank 0 logs at INFO, other ranks only warnings."""
    if level is None:
        level = logging.INFO if dist.launch_env().rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    # Megatron-Core logs every parameter name and config field at INFO; keep its warnings only.
    logging.getLogger("megatron.core").setLevel(max(level, logging.WARNING))
