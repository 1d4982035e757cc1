"""Checkpoints outside training (converters, tools, evaluation, weights-only starts): the converted
format, opening either format as a Source, building a layout to read it into.

The format itself (directory layout, meta.json with its CRC manifest, the converted metadata
file, errors) is defined once, in `megatron_ext.checkpoint`; this module reads and writes it.

A checkpoint directory holds Megatron-Core's distributed checkpoint of the model's
`sharded_state_dict()` (resharded on load, so it loads at any TP/PP/EP layout), and
`qwen_checkpoint.json` with the ModelConfig, the parameter dtype, and the HF config and
tokenizer files it came from (so converting back restores them). Training checkpoints written
by `megatron_ext.checkpoint` are read too (their model weights; the job config names the model).

Training checkpoints carry a CRC32 + size manifest of every file (their `meta.json`). Every reader
checks it before loading, the same check (`megatron_ext.checkpoint.verify`, spread over the
ranks) that training's resume runs, so corrupted weights are never converted or evaluated
silently; `open_checkpoint(..., verify=False)` (the tools' `--no-verify`) skips it with a warning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_ext import checkpoint as train_checkpoint
from megatron_ext.build import build_model, init_parallel
from megatron_ext.config import Config, ModelConfig, ParallelConfig, PrecisionConfig, validate
from megatron_ext.transformer import transformer_config

META_FILE = train_checkpoint.CONVERTED_META
FORMAT_VERSION = train_checkpoint.FORMAT_VERSION
CheckpointError = train_checkpoint.CheckpointError
TOKENIZER_DIR = "hf_tokenizer"
_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def precision_for(dtype: torch.dtype) -> str:
    if dtype not in _PRECISION:
        raise ValueError(f"parameter dtype {dtype} is not supported (use float32 or bfloat16)")
    return _PRECISION[dtype]


def layout_config(m: ModelConfig, dtype: torch.dtype, tp=1, pp=1, ep=1, etp=None, sp=None, world=None) -> Config:
    """A validated Config for running model `m` at a parallel layout on `world` ranks
    (default: the fewest the layout needs; more ranks become data-parallel replicas).

    sp=None turns sequence parallelism on exactly where Megatron requires it (MoE with TP>1);
    it changes activations only, never how weights are laid out.
    """
    if sp is None:
        sp = m.is_moe and tp > 1
    cfg = Config(model=m, parallel=ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, sp=sp),
                 precision=PrecisionConfig(name=precision_for(dtype)))
    validate(cfg, world or world_size(cfg))
    return cfg


def world_size(cfg: Config) -> int:
    """Ranks a layout needs: tp*pp model-parallel, widened to a multiple of ep*etp for experts."""
    p = cfg.parallel
    dense, expert = p.tp, p.ep * (p.etp or p.tp)
    lcm = dense * expert // math.gcd(dense, expert)
    return p.pp * lcm


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


def write_meta(ckpt: Path, m: ModelConfig, dtype: torch.dtype, hf_config: Optional[Dict[str, Any]]) -> None:
    meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(m),
            "dtype": str(dtype).replace("torch.", ""), "hf_config": hf_config}
    (ckpt / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class Source:
    """A readable Megatron checkpoint: where its dist_checkpointing files are and what model they hold."""

    dist_dir: Path
    model: ModelConfig
    dtype: torch.dtype
    hf_config: Optional[Dict[str, Any]] = None
    """The HF config the checkpoint was converted from (None for training checkpoints)."""
    tokenizer_dir: Optional[Path] = None
    tokenizer_name: Optional[str] = None
    """The training job's `data.tokenizer` (a Qwen family name or an HF tokenizer directory)."""
    nesting: Tuple[str, ...] = ()
    """Where the model's state dict sits inside the saved state (training: model/chunk0)."""
    manifest_dir: Optional[Path] = None
    """The checkpoint directory whose meta.json lists a CRC32 + size of every file (training
    checkpoints); None where there is no manifest to check."""
    verify: bool = True
    """Check the manifest in `load` (False: the user accepted the risk, e.g. --no-verify)."""


def _converter_source(path: Path) -> Source:
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META_FILE}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    tok = path / TOKENIZER_DIR
    return Source(path, ModelConfig(**meta["model"]), getattr(torch, meta["dtype"]), meta.get("hf_config"),
                  tok if tok.is_dir() else None)


def _training_source(path: Path) -> Source:
    # Written by megatron_ext.checkpoint: iter_N/{state/, meta.json with the whole job config}.
    try:
        meta = train_checkpoint.read_meta(path)  # names meta.json when it is truncated or foreign
    except train_checkpoint.CheckpointError as e:
        raise CheckpointError(str(e)) from None
    config = meta.get("config") or {}
    if "model" not in config:
        raise CheckpointError(f"{path / 'meta.json'} has no config.model")
    precision = (config.get("precision") or {}).get("name", "fp32")
    # Model weights are kept in bf16 by every non-fp32 recipe (FP8 casts happen inside the GEMMs).
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    tokenizer = (config.get("data") or {}).get("tokenizer")
    return Source(path / "state", ModelConfig(**config["model"]), dtype, tokenizer_name=tokenizer,
                  nesting=("model", "chunk0"), manifest_dir=path)


def open_checkpoint(ckpt: Union[str, Path, Source], verify: bool = True) -> Source:
    """A checkpoint written by tools.convert, a training checkpoint `iter_N/`, or a training
    checkpoint root (its `latest` is used). Reads metadata only: `load` reads the weights and,
    with `verify` (the default), first checks every file against the checkpoint's CRC manifest.

    An already opened Source is returned as it is, so a tool can open (and choose `verify`)
    once and hand the Source to its ranks."""
    if isinstance(ckpt, Source):
        return ckpt
    path = Path(ckpt)
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if (path / META_FILE).is_file():
        src = _converter_source(path)
    else:
        if (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()
        if not ((path / "meta.json").is_file() and (path / "state").is_dir()):
            raise CheckpointError(f"{ckpt} is not a checkpoint: no {META_FILE} (tools.convert) and no "
                                  "meta.json + state/ (training)")
        src = _training_source(path)
    src.verify = verify
    return src


def verify_manifest(src: Source) -> None:
    """Collective: check the checkpoint's files against its CRC manifest, as training's resume
    does (spread over the ranks); CheckpointError names every bad file. Without a manifest, or
    with `src.verify` off (a warning is printed), nothing is checked."""
    if src.manifest_dir is None:
        return
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not src.verify:
        if rank0:
            print(f"warning: not checking {src.manifest_dir} against its checksum manifest (--no-verify): "
                  "corrupted files would go unnoticed", file=sys.stderr)
        return
    try:
        train_checkpoint.verify(src.manifest_dir)
    except train_checkpoint.CheckpointError as e:
        raise CheckpointError(f"{e}\n(pass --no-verify to read it anyway)") from None


def read_meta(ckpt: Union[str, Source]) -> Tuple[ModelConfig, torch.dtype, Optional[Dict[str, Any]]]:
    """(ModelConfig, parameter dtype, source HF config or None) of any checkpoint `open_checkpoint` reads."""
    src = open_checkpoint(ckpt)
    return src.model, src.dtype, src.hf_config


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


def save(chunks: List[torch.nn.Module], ckpt_dir: Path) -> None:
    """Collective: write this rank's part of the model into `ckpt_dir` (torch_dist format)."""
    dist_checkpointing.save(chunks[0].sharded_state_dict(), str(ckpt_dir))


def load(chunks: List[torch.nn.Module], src: Source) -> None:
    """Collective: fill this rank's model chunk from a checkpoint written at any layout, after
    checking its files against its CRC manifest (see `verify_manifest`)."""
    if len(chunks) != 1:
        raise ValueError("virtual pipeline stages are not supported by the converter tools")
    verify_manifest(src)
    request = chunks[0].sharded_state_dict()
    for key in reversed(src.nesting):
        request = {key: request}
    # Non-tensor state saved beside the model (e.g. a training run's optimizer groups) comes
    # back merged at the top level; descending into the model's entry leaves it behind.
    state = dist_checkpointing.load(request, str(src.dist_dir))
    for key in src.nesting:
        state = state[key]
    chunks[0].load_state_dict(state, strict=True)
