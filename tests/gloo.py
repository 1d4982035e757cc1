"""Run a function on N spawned CPU ranks over gloo and collect each rank's result or failure.

    results = run_on_ranks(fn, 2, arg1, arg2)   # fn(rank, world_size, *args) on every rank

`fn` must be importable (a module-level function in a test module). Each rank gets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun would set them; the function
is responsible for its own process-group init (usually via megatron_ext.build.init_parallel).
A failure on any rank raises RankFailure carrying every failing rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import time
import socket
import traceback
from typing import Any, Callable, List

DEFAULT_TIMEOUT_S = 600


class RankFailure(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One compute thread per rank: N ranks share this machine's cores.
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle bytes: torch's multiprocessing reducers would pass tensors through
        # shared memory that disappears when this process exits.
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, True, result))
    except BaseException:  # report everything, including SystemExit from a CLI
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_ext import dist

            dist.destroy()
        except Exception:
            pass


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, failures = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size and not failures:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
                (results if ok else failures)[rank] = payload
                continue
            except queue_module.Empty:
                pass
            # A rank killed (or crashed hard) reports nothing; the others would wait for it in
            # a collective until the process-group timeout. Fail fast instead.
            for rank, p in enumerate(procs):
                if p.exitcode is not None and rank not in results and rank not in failures:
                    time.sleep(0.5)  # its result may still be in flight
                    if queue.empty():
                        failures[rank] = f"process died with exit code {p.exitcode} without a result"
            if time.monotonic() > deadline:
                failures[-1] = f"timed out after {timeout}s waiting for ranks"
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
                p.join()
            elif failures and p.exitcode not in (0, None):
                # A rank that died on its own is the root cause; the others' collective errors
                # (connection closed/reset) are consequences. Always name it.
                rank = procs.index(p)
                failures.setdefault(rank, f"process died with exit code {p.exitcode} without a result")
    if failures:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise RankFailure(f"{len(failures)} rank(s) failed:\n{report}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RankFailure(f"ranks {missing} exited without a result (exit codes "
                          f"{[p.exitcode for p in procs]})")
    return [pickle.loads(results[r]) for r in range(world_size)]
