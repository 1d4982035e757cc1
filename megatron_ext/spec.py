"""Layer-spec choice: Transformer Engine when TE and CUDA are present, Megatron's local spec otherwise."""

from __future__ import annotations

import functools
import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig


@functools.lru_cache(maxsize=None)
def use_transformer_engine() -> bool:
    """True when TE can be used: CUDA present and transformer_engine importable."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def decoder_block_spec(config: TransformerConfig, vp_stage=None):
    """The decoder block spec for this pipeline stage (dense or MoE layers per moe_layer_freq)."""
    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine(),
        normalization="RMSNorm",
        vp_stage=vp_stage,
    )
