"""Run a function on N spawned CPU ranks over gloo and collect each rank's result or failure.

    results = run_on_ranks(fn, 2, arg1, arg2)   # fn(rank, world_size, *args) on every rank

`fn` must be importable (a module-level function in a test module). Each rank gets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun would set them; the function
is responsible for its own process-group init (usually via megatron_ext.build.init_parallel).
A failure on any rank raises RankFailure carrying every failing rank's traceback.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List

from megatron_ext.dist import RankFailure, spawn

DEFAULT_TIMEOUT_S = 600

__all__ = ["RankFailure", "run_on_ranks"]


def _with_rank(fn, *args):
    return fn(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), *args)


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned processes; return results by rank.

    One compute thread per rank: N ranks share this machine's cores."""
    return spawn(_with_rank, world_size, fn, *args, timeout=timeout, threads=1)
