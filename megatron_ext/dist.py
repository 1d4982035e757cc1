"""Distributed init: torchrun / Slurm / single process; NCCL with CUDA, gloo without."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def _int_env(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def launch_env() -> LaunchEnv:
    """Rank/world size from torchrun (RANK...) or Slurm (SLURM_PROCID...); else one process."""
    if "RANK" in os.environ:
        return LaunchEnv(_int_env("RANK", default=0), _int_env("WORLD_SIZE", default=1),
                         _int_env("LOCAL_RANK", default=0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return LaunchEnv(_int_env("SLURM_PROCID", default=0), _int_env("SLURM_NTASKS", default=1),
                         _int_env("SLURM_LOCALID", default=0))
    return LaunchEnv(0, 1, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_minutes: int = 10) -> LaunchEnv:
    """Create the default process group (idempotent)."""
    env = launch_env()
    if torch.distributed.is_initialized():
        return env
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"{name} is not set for a {env.world_size}-process launch; use torchrun or set "
                "MASTER_ADDR/MASTER_PORT (the Slurm launcher does this)"
            )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    torch.distributed.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    log.info("process group: backend=%s rank=%d world_size=%d", backend, env.rank, env.world_size)
    return env


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
