"""Step metrics: a console line per step on rank 0, plus TensorBoard and wandb when configured."""

from __future__ import annotations

import logging
import time
from typing import Dict, Optional

from megatron_ext import dist
from megatron_ext.config import Config

log = logging.getLogger("megatron_ext.train")


class Metrics:
    """Writes scalars to the console and, on rank 0, to TensorBoard / wandb."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.start = time.time()
        self.tb = None
        self.wandb_run = None
        if not dist.is_rank0():
            return
        lc = cfg.logger
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
        self._write(step, scalars)

    def _write(self, step: int, scalars: Dict[str, float]) -> None:
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(scalars), step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def setup_console_logging(level: Optional[int] = None) -> None:
    """Rank 0 logs at INFO, other ranks only warnings."""
    if level is None:
        level = logging.INFO if dist.launch_env().rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    # Megatron-Core logs every parameter name and config field at INFO; keep its warnings only.
    logging.getLogger("megatron.core").setLevel(max(level, logging.WARNING))
