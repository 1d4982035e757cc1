"""Preemption and non-finite guards, agreed on by every rank at step boundaries."""

from __future__ import annotations

import logging
import signal
from typing import List, Optional

import torch

from megatron_ext.stages import LOSS

log = logging.getLogger(__name__)

# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving: "temporary failure, retry"
# (EX_TEMPFAIL). The Slurm launcher requeues the job on it.
REQUEUE_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped training; names ranks and step."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; exits with REQUEUE_EXIT_CODE."""

    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


class PreemptionWatcher:
    """Records SIGTERM/SIGUSR1 on this rank; `requested()` tells whether any rank got one."""

    def __init__(self):
        self.signum: Optional[int] = None
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        log.warning("received %s: will save and exit at the next step boundary", signal.Signals(signum).name)

    def requested(self) -> bool:
        """Collective: True on every rank if any rank received a preemption signal."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())



_watcher: Optional[PreemptionWatcher] = None


def preemption_watcher() -> PreemptionWatcher:
    """The process-wide watcher, installed on first use. Entry points call this first thing,
    so a signal that arrives during imports or model build is not lost."""
    global _watcher
    if _watcher is None:
        _watcher = PreemptionWatcher()
    return _watcher


def _local_status(model, reports: List[dict]) -> torch.Tensor:
    """0 ok, 1 non-finite gradient, 2 non-finite loss (on this rank, before reduction), as a
    0-dim int32 tensor on the gradients' device: no host sync, and no temporary the size of the
    gradients (a buffer is finite iff its largest absolute value is; NaN propagates)."""
    buffers = [b.grad_data for chunk in model for b in chunk.buffers + chunk.expert_parallel_buffers
               if b.grad_data.numel()]
    grads_ok = torch.isfinite(torch.stack([torch.linalg.vector_norm(b, float("inf")) for b in buffers])).all()
    status = torch.where(grads_ok, 0, 1)
    if reports:  # (only the last pipeline stage has them)
        losses = torch.cat([r[LOSS].reshape(-1).to(status.device) for r in reports])
        status = torch.where(torch.isfinite(losses).all(), status, 2)
    return status.to(torch.int32)


def non_finite(model, reports: List[dict], step: int) -> Optional[str]:
    """Collective: a message naming the ranks with a non-finite loss/grad at `step`, or None."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    local = _local_status(model, reports)
    status = torch.zeros(world, dtype=torch.int32, device=local.device)
    status[rank] = local
    torch.distributed.all_reduce(status)
    status = status.cpu().tolist()
    if not any(status):
        return None
    loss_ranks = [r for r, s in enumerate(status) if s == 2]
    if loss_ranks:
        return f"non-finite loss on rank(s) {loss_ranks} at step {step}"
    return f"non-finite gradients on rank(s) {[r for r, s in enumerate(status) if s]} at step {step}"
