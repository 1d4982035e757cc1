"""Where a rank's parameter sits in the single-process model: global names and tensor-parallel pieces.

A parameter of one rank is named as in its own model chunk (`decoder.layers.0...` is the first
layer *of this pipeline stage*, `local_experts.0` the first expert *of this expert-parallel
rank*) and holds one tensor-parallel piece. The functions here map it to the TP=PP=EP=1 model,
which is what the converters, the layout-independent initialisation and the tools agree on.
Names are those of the local layer spec and of SequentialMLP (see
`grouped_experts.sequential_named_parameters` for the grouped experts).
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
from megatron.core import parallel_state

from megatron_ext.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")

# Tensor-parallel split dimension by parameter name. Taken from the names rather than Megatron's
# `partition_dim` attributes because those are only attached by the weight initialisers, which
# the converters skip.
_SPLIT_DIM = {"embedding.word_embeddings.weight": 0, "output_layer.weight": 0, "linear_qkv.weight": 0,
              "linear_qkv.bias": 0, "linear_fc1.weight": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}


def global_name(chunk: torch.nn.Module, name: str, m: ModelConfig) -> str:
    """This rank's parameter name -> the TP=PP=EP=1 name (global layer and expert numbers)."""
    match = _LAYER.match(name)
    if match:
        layer = chunk.decoder.layers[int(match.group(1))].layer_number - 1  # layer_number is global, 1-based
        name = f"decoder.layers.{layer}." + name[match.end():]
    match = _EXPERT.search(name)
    if match:
        per_rank = m.num_experts // parallel_state.get_expert_model_parallel_world_size()
        expert = parallel_state.get_expert_model_parallel_rank() * per_rank + int(match.group(1))
        name = name[:match.start()] + f".local_experts.{expert}." + name[match.end():]
    return name


def split(name: str) -> Tuple[Optional[int], int, int]:
    """(split dim or None, TP size, TP rank) of a parameter; experts use the expert-TP group."""
    dim = next((d for suffix, d in _SPLIT_DIM.items() if name == suffix or name.endswith("." + suffix)), None)
    if ".mlp.experts." in name:
        return (dim, parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return dim, parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def shard_index(name: str, full_len: int, size: int, rank: int) -> torch.Tensor:
    """Indices into the full tensor's split dimension that rank `rank` of `size` holds, in its order."""
    if name.endswith("linear_fc1.weight") and size > 1:
        # SwiGLU: each rank holds [its gate rows; its up rows], not a slice of [gate; up].
        half, piece = full_len // 2, full_len // (2 * size)
        gate = torch.arange(rank * piece, (rank + 1) * piece)
        return torch.cat([gate, gate + half])
    piece = full_len // size
    return torch.arange(rank * piece, (rank + 1) * piece)


def tp_shard(full: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's tensor-parallel piece of the full tensor for parameter `name`."""
    dim, size, rank = split(name)
    if dim is None or size == 1:
        return full
    return full.index_select(dim, shard_index(name, full.shape[dim], size, rank))


def full_shape(param: torch.Tensor, name: str) -> Tuple[int, ...]:
    """The unsharded shape of a (possibly tensor-parallel) parameter."""
    dim, size, _ = split(name)
    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= size
    return tuple(shape)
