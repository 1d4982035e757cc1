"""Initial weights that depend on the seed and the architecture only, never on the parallel layout.

Megatron-Core draws each rank's weights from that rank's RNG stream as its modules are built,
so the same seed gives a different model under PP (a stage builds only its layers) or EP (a
rank only its experts), and on GPU under TP as well. That makes a scaled-up debug run, or two
layouts, impossible to compare. Here every element of the single-process (TP=PP=EP=1) model
has one value, a function of (train.seed, the parameter's global name, its position), and each
rank writes the elements it holds:

- the full tensor is cut into blocks of whole rows (a fixed number of elements per block that
  depends on the full shape only); block b of parameter `name` is drawn from a generator
  seeded with hash(seed, name, b) with Megatron's own init function for that parameter
  (`init_method`, or `output_layer_init_method` for the projections back into the residual
  stream), so the distribution is the one Megatron-Core would use;
- a rank draws only the blocks that contain its rows (for a row-split piece) or all blocks,
  keeping its columns (for a column-split piece), one block in memory at a time;
- norm weights are ones (zeros with zero-centred gamma), linear biases zeros.

A tied output layer on the last pipeline stage gets the embedding's values. Values drawn on a
GPU differ from values drawn on the CPU (different generators); within one device type every
layout gets the same model.
"""

from __future__ import annotations

import hashlib
from typing import Callable, List, Optional

import torch
from megatron.core.transformer import TransformerConfig

from megatron_ext.config import Config
from megatron_ext.grouped_experts import sequential_named_parameters
from megatron_ext.placement import full_shape, global_name, shard_index, split

BLOCK_ELEMENTS = 1 << 22
"""Elements drawn per block (rounded to whole rows); part of the definition of the initial model."""

_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")
_NORMS = ("layernorm.weight", "layer_norm_weight")


def _init_fn(name: str, tcfg: TransformerConfig) -> Optional[Callable]:
    """Megatron's initialiser of a weight drawn at random, or None for constant-initialised ones."""
    if name.endswith(_RESIDUAL_OUT):
        return tcfg.output_layer_init_method
    if name.endswith("word_embeddings.weight"):
        return tcfg.embedding_init_method
    if name.endswith(("linear_qkv.weight", "linear_fc1.weight", "output_layer.weight", "router.weight",
                      "router.bias", "shared_experts.gate_weight")):
        return tcfg.init_method
    return None


def _constant(name: str, tcfg: TransformerConfig) -> float:
    if name.endswith(_NORMS):
        return 0.0 if tcfg.layernorm_zero_centered_gamma else 1.0
    if name.endswith("bias"):  # linear and norm biases
        return 0.0
    raise ValueError(f"layout-independent init: no rule for parameter {name!r}; add it to megatron_ext/init.py")


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def draw(param: torch.Tensor, name: str, local_name: str, init_fn: Callable, seed: int) -> None:
    """Fill `param` (this rank's piece of global parameter `name`) block by block."""
    shape = full_shape(param, local_name)
    dim, size, rank = split(local_name)
    row_elems = max(1, int(torch.Size(shape[1:]).numel()))
    rows_per_block = max(1, BLOCK_ELEMENTS // row_elems)
    if dim == 0 and size > 1:
        rows = shard_index(local_name, shape[0], size, rank)
        cols = None
    else:
        rows = torch.arange(shape[0])
        cols = shard_index(local_name, shape[1], size, rank) if dim == 1 and size > 1 else None
    gen = torch.Generator(device=param.device)
    for block in torch.unique(rows // rows_per_block).tolist():
        start = block * rows_per_block
        n = min(rows_per_block, shape[0] - start)
        values = torch.empty((n, *shape[1:]), dtype=torch.float32, device=param.device)
        gen.manual_seed(block_seed(seed, name, block))
        init_fn(values, generator=gen)
        where = ((rows >= start) & (rows < start + n)).nonzero().squeeze(1)
        values = values.index_select(0, (rows[where] - start).to(param.device))
        if cols is not None:
            values = values.index_select(1, cols.to(param.device))
        param.index_copy_(0, where.to(param.device), values.to(param.dtype))


@torch.no_grad()
def initialize(chunks: List[torch.nn.Module], cfg: Config, tcfg: TransformerConfig) -> None:
    """Overwrite every parameter of this rank's chunks with its layout-independent initial value."""
    seed = cfg.train.seed
    for chunk in chunks:
        for local_name, param in sequential_named_parameters(chunk):
            name = global_name(chunk, local_name, cfg.model)
            if name == "output_layer.weight" and cfg.model.tie_word_embeddings:
                name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
            init_fn = _init_fn(name, tcfg)
            if init_fn is None:
                param.fill_(_constant(name, tcfg))
            else:
                draw(param, name, local_name, init_fn, seed)
