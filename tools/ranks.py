"""Run a tool's per-rank function on the ranks a parallel layout needs.

Under torchrun / Slurm (or a test harness that already set RANK/WORLD_SIZE) the function runs
in this process. Otherwise a one-rank layout runs in this process and a larger one is spawned
on local CPU ranks over gloo, so `python -m tools.convert ... --tp 2` works on a laptop.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from megatron_ext.dist import RankFailure, spawn


class RankError(RuntimeError):
    """A spawned rank failed; carries that rank's error message."""


def run(fn: Callable, world_size: Optional[int], *args: Any) -> Any:
    """fn(*args) on `world_size` ranks (None: the launcher's ranks, else one); returns rank 0's result."""
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None:
        if world_size is not None and int(env_world) != world_size:
            raise ValueError(f"the layout needs {world_size} ranks but WORLD_SIZE={env_world}")
        return fn(*args)
    if world_size in (None, 1):
        return fn(*args)
    try:
        return spawn(fn, world_size, *args)[0]
    except RankFailure as e:
        raise RankError(e.first()) from None
