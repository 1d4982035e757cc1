"""Distributed init: torchrun / Slurm / single process; NCCL with CUDA, gloo without."""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

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


def free_port() -> int:
    """A TCP port free on this host now (for a local rendezvous)."""
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
        os.environ.setdefault("MASTER_PORT", str(free_port()))
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


# ------------------------------------------------------------------ local ranks

class RankFailure(RuntimeError):
    """Spawned ranks failed. `errors[rank]` is what to show a user (the message of an input error
    such as "ValueError: ...", else the traceback), `tracebacks[rank]` the full traceback; rank -1
    stands for a timeout."""

    def __init__(self, errors: Dict[int, str], tracebacks: Dict[int, str]):
        self.errors, self.tracebacks = errors, tracebacks
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(tracebacks.items()))
        super().__init__(f"{len(errors)} rank(s) failed:\n{report}")

    def first(self) -> str:
        """'rank R failed: <short error>' for the lowest failing rank (the one to show a user)."""
        rank = min(self.errors)
        return f"rank {rank} failed: {self.errors[rank]}"


def _spawned(fn, rank, world_size, port, threads, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # Plain pickle bytes: torch's multiprocessing reducers would pass tensors through shared
        # memory that disappears when this process exits.
        queue.put((rank, True, pickle.dumps(fn(*args)), None))
    except BaseException as e:  # report every failure, including SystemExit from a CLI
        tb = traceback.format_exc()
        # Errors about the input carry their own message; anything else is shown with its traceback.
        queue.put((rank, False, tb, f"{type(e).__name__}: {e}" if isinstance(e, (ValueError, KeyError, OSError)) else tb))
    finally:
        destroy()


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 3600.0,
          threads: Optional[int] = None, start_method: str = "spawn") -> List[Any]:
    """fn(*args) on `world_size` local processes over gloo, launched as torchrun would (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set); returns the results by rank.

    `fn` must be importable (a module-level function). A failing, killed or hung rank raises
    RankFailure naming it; the other ranks, which may wait for it in a collective, are killed.
    `threads` caps each rank's compute threads (ranks share the host's cores). `start_method`
    is multiprocessing's: `spawn` (a fresh interpreter per rank) or `forkserver` (ranks forked
    from a server process that has imported what `multiprocessing.set_forkserver_preload` names).
    """
    ctx = mp.get_context(start_method)
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_spawned, args=(fn, r, world_size, port, threads, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, bytes] = {}
    errors: Dict[int, str] = {}
    tracebacks: Dict[int, str] = {}

    def died(rank: int, code) -> None:
        errors[rank] = tracebacks[rank] = f"process died with exit code {code} without a result"

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size and not errors:
            try:
                rank, ok, payload, short = queue.get(timeout=1.0)
                if ok:
                    results[rank] = payload
                else:
                    errors[rank], tracebacks[rank] = short, payload
                continue
            except queue_module.Empty:
                pass
            # A rank killed (or crashed hard) reports nothing; the others would wait for it in a
            # collective until the process-group timeout. Fail fast instead.
            for rank, p in enumerate(procs):
                if p.exitcode is not None and rank not in results and rank not in errors:
                    time.sleep(0.5)  # its result may still be in flight
                    if queue.empty():
                        died(rank, p.exitcode)
            if time.monotonic() > deadline:
                errors[-1] = tracebacks[-1] = f"timed out after {timeout}s waiting for ranks"
    finally:
        for rank, p in enumerate(procs):
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
            elif errors and p.exitcode not in (0, None) and rank not in errors:
                # A rank that died on its own is the root cause; the others' collective errors
                # (connection closed/reset) are consequences. Always name it.
                died(rank, p.exitcode)
    if errors:
        raise RankFailure(errors, tracebacks)
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RankFailure({r: "exited without a result" for r in missing},
                          {r: f"exited without a result (exit code {procs[r].exitcode})" for r in missing})
    return [pickle.loads(results[r]) for r in range(world_size)]
