"""`run_on_ranks` (tests/gloo.py) with the ranks forked from a server that has imported torch,
Megatron-Core and megatron_ext once, instead of each rank starting a fresh interpreter.

    results = run_on_ranks(fn, 2, arg1, arg2)   # as tests.gloo.run_on_ranks

Each rank is still a new process that has run nothing but imports: the fork server (Python's
`forkserver` start method) never builds a model, initialises a process group or trains, so no
state of an earlier run can leak into a later one; it only saves every rank the ~3-6 s of
importing Megatron-Core. Failures, kills (exit codes) and timeouts are reported exactly as by
`megatron_ext.dist.spawn`, which runs the ranks with start_method="forkserver".

The server's environment is fixed when it starts (first call): tests that need per-run
environment variables in their ranks use tests.gloo instead.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, List

from megatron_ext import dist
from tests.gloo import DEFAULT_TIMEOUT_S, RankFailure, _with_rank

__all__ = ["RankFailure", "run_on_ranks"]

PRELOAD = ["torch", "megatron.core", "megatron_ext.build", "megatron_ext.checkpoint", "megatron_ext.cli",
           "megatron_ext.loop", "megatron_ext.pretrain", "tests.gloo"]

_preloaded = False


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """Run fn(rank, world_size, *args) on `world_size` forked processes; return results by rank."""
    global _preloaded
    if not _preloaded:  # the server starts with the first forkserver process, importing PRELOAD
        multiprocessing.set_forkserver_preload(PRELOAD)
        _preloaded = True
    return dist.spawn(_with_rank, world_size, fn, *args, timeout=timeout, threads=1, start_method="forkserver")
