"""Step metrics: a console line per step on rank 0, plus TensorBoard, wandb and a jsonl file
when configured. Every stage's metrics take this one path (the loop reduces them)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

from megatron_ext import dist
from megatron_ext.config import Config

log = logging.getLogger("megatron_ext.train")


class Metrics:
    """Writes scalars to the console and, on rank 0, to TensorBoard / wandb."""

    def __init__(self, cfg: Config, resumed_step: int = 0):
        self.cfg = cfg
        self.start = time.time()
        self.tb = None
        self.wandb_run = None
        self.jsonl = None
        if not dist.is_rank0():
            return
        lc = cfg.logger
        if lc.metrics_file:
            self.jsonl = open_metrics_file(Path(lc.metrics_file), resumed_step)
        if lc.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=lc.tensorboard_dir)
        if lc.wandb:
            import wandb

            from omegaconf import OmegaConf

            self.wandb_run = wandb.init(
                project=lc.wandb_project, mode=lc.wandb_mode, dir=lc.wandb_dir,
                config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            )

    def log_step(self, step: int, scalars: Dict[str, float]) -> None:
        if not dist.is_rank0():
            return
        if step % self.cfg.logger.log_interval == 0 or step == self.cfg.train.steps:
            parts = [f"step {step:>6d}/{self.cfg.train.steps}"]
            for key, value in scalars.items():
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
            parts.append(f"elapsed {time.time() - self.start:.1f}s")
            log.info(" | ".join(parts))
        self._write(step, scalars)

    def log_eval(self, step: int, scalars: Dict[str, float]) -> None:
        scalars = {k: v for k, v in scalars.items() if v is not None}  # e.g. no loss tokens
        if not dist.is_rank0() or not scalars:
            return
        log.info("eval at step %d | %s", step, " | ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        self._write(step, scalars, kind="eval")

    def _write(self, step: int, scalars: Dict[str, float], kind: str = "train") -> None:
        if self.jsonl is not None:
            record = {"step": step, "kind": kind,
                      **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in scalars.items()}}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(scalars), step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


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
