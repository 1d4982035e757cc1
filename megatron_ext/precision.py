"""What this machine's GPU and Transformer Engine support, queried lazily (no TE import on CPU)."""

from __future__ import annotations

import importlib.util
from typing import Tuple

import torch


def fp8_support(name: str) -> Tuple[bool, str]:
    """Whether FP8 recipe `name` can run on this machine, and if not, why.

    Needs CUDA and Transformer Engine; `fp8_blockwise` also needs a Hopper-class GPU (compute
    capability >= 9.0) that TE's own support query accepts. TE is imported only with CUDA."""
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU with Transformer Engine and none is visible (use precision=fp32 on CPU)"
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "needs Transformer Engine (`pip install -e .[gpu]`), which is not installed"
    blockwise = name == "fp8_blockwise"
    cap, gpu = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if blockwise and cap < (9, 0):
        return False, f"needs a Hopper or newer GPU (compute capability >= 9.0); {gpu} is {cap[0]}.{cap[1]}"
    import transformer_engine.pytorch as te

    query = getattr(te, "is_fp8_block_scaling_available" if blockwise else "is_fp8_available", None)
    if query is not None:
        ok, reason = query(return_reason=True)
    else:  # Transformer Engine before 2.8 keeps the queries in its fp8 module
        from transformer_engine.pytorch import fp8 as te_fp8

        ok, reason = (te_fp8.check_fp8_block_scaling_support if blockwise else te_fp8.check_fp8_support)()
    return bool(ok), "" if ok else f"is not supported by Transformer Engine on {gpu}: {reason}"
