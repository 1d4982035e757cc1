"""Which FP8 backend a config gets, and what this machine's GPU, Transformer Engine and torchao
support, queried lazily (no TE or torchao import on CPU unless FP8 is asked for).

Backends (`precision.fp8_backend`): `te` runs FP8 inside Transformer Engine's layers (every
recipe); `torchao` runs `fp8_current` and `fp8_rowwise` through torchao's float8 GEMMs in
Megatron's own linear layers (megatron_ext.fp8), on sm89+ GPUs or, with `precision.fp8_emulate`,
in an fp32 emulation anywhere; `auto` takes TE where it can be used, torchao otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

TE_ONLY = ("fp8_delayed", "fp8_blockwise")
"""Recipes only Transformer Engine runs."""
TORCHAO_ONLY = ("fp8_rowwise",)
"""Recipes only torchao runs."""
TORCHAO_MIN_CAPABILITY = (8, 9)
"""torch._scaled_mm's FP8 kernels: Ada, Hopper and newer."""


def fp8_backend(precision) -> Optional[str]:
    """`te` or `torchao` for an FP8 `precision` config section (None for fp32/bf16)."""
    if not precision.name.startswith("fp8_"):
        return None
    if precision.fp8_emulate or precision.name in TORCHAO_ONLY:
        return "torchao"
    if precision.fp8_backend != "auto":
        return precision.fp8_backend
    if precision.name in TE_ONLY:
        return "te"
    from megatron_ext.spec import use_transformer_engine

    return "te" if use_transformer_engine() else "torchao"


def fp8_support(name: str, backend: str = "te", emulate: bool = False) -> Tuple[bool, str]:
    """Whether FP8 recipe `name` can run on this machine through `backend`, and if not, why."""
    if backend == "torchao":
        return _torchao_support(emulate)
    if not torch.cuda.is_available():
        return False, ("needs a CUDA GPU with Transformer Engine and none is visible (precision.fp8_emulate=true "
                       "emulates fp8_current/fp8_rowwise on CPU; or use precision=fp32)")
    if importlib.util.find_spec("transformer_engine") is None:
        return False, ("needs Transformer Engine (`pip install -e .[gpu]`), which is not installed"
                       + ("" if name in TE_ONLY else "; precision.fp8_backend=torchao runs it without"))
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


def _torchao_support(emulate: bool) -> Tuple[bool, str]:
    if importlib.util.find_spec("torchao") is None:
        return False, "with precision.fp8_backend=torchao needs torchao (`pip install torchao`), which is not installed"
    from megatron_ext.spec import use_transformer_engine

    if use_transformer_engine():
        return False, ("with precision.fp8_backend=torchao runs in Megatron's local layers, but Transformer Engine "
                       "is installed and its layers are used here: set precision.fp8_backend=te (or auto)")
    if emulate:
        return True, ""
    if not torch.cuda.is_available():
        return False, ("needs a CUDA GPU with FP8 GEMMs (compute capability >= 8.9; run through torchao, "
                       "precision.fp8_backend=torchao) and none is visible: precision.fp8_emulate=true "
                       "emulates it on CPU")
    cap, gpu = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if cap < TORCHAO_MIN_CAPABILITY:
        return False, (f"through torchao needs compute capability >= 8.9 (Ada, Hopper or newer); {gpu} is "
                       f"{cap[0]}.{cap[1]} (precision.fp8_emulate=true emulates it)")
    return True, ""
