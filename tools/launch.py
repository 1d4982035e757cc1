"""Run a tool's per-rank function on the ranks a parallel layout needs.

Under torchrun / Slurm (or a test harness that already set RANK/WORLD_SIZE) the function runs
in this process. Otherwise a one-rank layout runs in this process and a larger one is spawned
on local CPU ranks over gloo, so `python -m tools.convert ... --tp 2` works on a laptop.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable, Optional


class RankError(RuntimeError):
    """A spawned rank failed; carries that rank's error message."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world_size: int, port: int, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        queue.put((rank, None, fn(*args)))
    except BaseException as e:  # report every failure, including SystemExit
        detail = str(e) if isinstance(e, (ValueError, KeyError, FileNotFoundError)) else traceback.format_exc()
        queue.put((rank, f"{type(e).__name__}: {detail}", None))
    finally:
        from megatron_ext import dist

        dist.destroy()


def run(fn: Callable, world_size: Optional[int], *args: Any) -> Any:
    """fn(*args) on `world_size` ranks (None: the launcher's ranks, else one); returns rank 0's result."""
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None:
        if world_size is not None and int(env_world) != world_size:
            raise ValueError(f"the layout needs {world_size} ranks but WORLD_SIZE={env_world}")
        return fn(*args)
    if world_size in (None, 1):
        return fn(*args)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in procs:
            rank, err, result = queue.get(timeout=3600)
            (errors if err else results)[rank] = err or result
            if errors:
                break  # the other ranks may be stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RankError(f"rank {rank} failed: {errors[rank]}")
    return results.get(0)
