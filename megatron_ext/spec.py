"""Layer-spec choice: Transformer Engine when TE and CUDA are present, Megatron's local spec otherwise.

The local spec gets three substitutions: an RMSNorm that supports sequence parallelism and a
core attention that supports context parallelism (megatron_ext.local_layers), and, where
`moe_grouped_gemm` is on, experts run as grouped GEMMs (megatron_ext.grouped_experts) in place
of Megatron's legacy GroupedMLP, which needs the CUDA-only `grouped_gemm` package.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import warnings

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_ext.grouped_experts import GroupedExperts
from megatron_ext.local_layers import CoreAttention, RMSNorm

_LOCAL_SUBSTITUTES = {WrappedTorchNorm: RMSNorm, DotProductAttention: CoreAttention, GroupedMLP: GroupedExperts}


@functools.lru_cache(maxsize=None)
def use_transformer_engine() -> bool:
    """True when TE can be used: CUDA present and transformer_engine importable."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def _substitute(spec):
    """Copy of a spec tree with the local substitutes swapped in."""
    if isinstance(spec, type):
        return _LOCAL_SUBSTITUTES.get(spec, spec)
    if isinstance(spec, (list, tuple)):
        return type(spec)(_substitute(s) for s in spec)
    if isinstance(spec, ModuleSpec) or dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _substitute(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    return spec


def decoder_block_spec(config: TransformerConfig, vp_stage=None):
    """The decoder block spec for this pipeline stage (dense or MoE layers per moe_layer_freq)."""
    te = use_transformer_engine()
    with warnings.catch_warnings():
        # The local spec names the legacy GroupedMLP (and warns about it); it is replaced below.
        warnings.filterwarnings("ignore", message="The legacy GroupedMLP")
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm",
                                          vp_stage=vp_stage)
    return spec if te else _substitute(spec)
