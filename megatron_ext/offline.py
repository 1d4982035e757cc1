"""Running a model outside training (converters, tools, evaluation): a validated layout Config
for a model read from a checkpoint, building that layout's model chunks and releasing it for the
next one, and a staging directory with an atomic publish for what a tool writes.

The checkpoint format (training and converted checkpoints, opening either as a `Source`, the one
weights reader `load_weights`, CRC manifest checks, `CheckpointError`) is `megatron_ext.checkpoint`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List

import torch
from megatron.core import parallel_state

from megatron_ext.build import build_model, init_parallel
from megatron_ext.config import Config, ModelConfig, ParallelConfig, PrecisionConfig, validate
from megatron_ext.layout import min_world_size
from megatron_ext.transformer import transformer_config

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def precision_for(dtype: torch.dtype) -> str:
    if dtype not in _PRECISION:
        raise ValueError(f"parameter dtype {dtype} is not supported (use float32 or bfloat16)")
    return _PRECISION[dtype]


def layout_config(m: ModelConfig, dtype: torch.dtype, tp=1, pp=1, ep=1, etp=None, sp=None, world=None,
                  vpp=None) -> Config:
    """A validated Config for running model `m` at a parallel layout on `world` ranks
    (default: the fewest the layout needs; more ranks become data-parallel replicas).

    sp=None turns sequence parallelism on exactly where Megatron requires it (MoE with TP>1);
    it changes activations only, never how weights are laid out. vpp: virtual pipeline stages
    per pipeline rank (None: one).
    """
    if sp is None:
        sp = m.is_moe and tp > 1
    cfg = Config(model=m, parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sp=sp),
                 precision=PrecisionConfig(name=precision_for(dtype)))
    validate(cfg, world or world_size(cfg))
    return cfg


def world_size(cfg: Config) -> int:
    """Ranks a layout needs: the fewest Megatron-Core accepts (`Layout.min_world`)."""
    return min_world_size(cfg.parallel)


def build(cfg: Config) -> List[torch.nn.Module]:
    """Init the layout and build this rank's model chunk(s), weights left uninitialised.

    Every weight is then filled from a checkpoint, so random init would only cost time.
    """
    init_parallel(cfg)
    tcfg = transformer_config(cfg)
    tcfg.perform_initialization = False
    chunks = build_model(cfg, tcfg)  # applies RoPE scaling (YaRN) as in training
    for chunk in chunks:
        chunk.eval()
    return chunks


def release_layout() -> None:
    """Forget the model-parallel groups (the process group stays) so another layout can follow."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def staging_dir(out: Path) -> Path:
    """A fresh sibling directory to write into before the final rename (agreed on by all ranks)."""
    path = [None]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        path[0] = str(out.parent / f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(path[0], ignore_errors=True)
        os.makedirs(path[0])
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(path, src=0)
    return Path(path[0])


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename a finished staging directory into place (rank 0 only)."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    os.replace(tmp, out)
