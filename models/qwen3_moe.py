"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (QK-norm, decoupled head_dim),
routed experts only (128 experts, top-8, `norm_topk_prob`), no shared expert."""

from __future__ import annotations

from typing import Any, Dict, Optional

from models.config import ModelConfig
from models import mapping as mp
from models.hf_config import as_dict, dense_from_hf, dense_to_hf, moe_from_hf, moe_to_hf
from models.qwen3 import attention_fields, attention_to_hf

FAMILY = "qwen3_moe"
MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"

RULES = [mp.EMBEDDING, *mp.ATTENTION, *mp.QK_NORM, *mp.DENSE_MLP, *mp.ROUTER, *mp.ROUTED_EXPERTS,
         mp.FINAL_NORM, mp.OUTPUT]


def config_from_hf(hf: Any, name: Optional[str] = None) -> ModelConfig:
    """HF Qwen3-MoE config (dict or transformers config) -> ModelConfig."""
    hf = as_dict(hf)
    dense = dense_from_hf(hf, FAMILY, name or "qwen3_moe_hf")
    return ModelConfig(**dense, **attention_fields(hf), **moe_from_hf(hf, dense["num_layers"]))


def config_to_hf(m: ModelConfig) -> Dict[str, Any]:
    """ModelConfig -> HF Qwen3-MoE `config.json` fields."""
    if not m.is_moe or m.moe_shared_expert_intermediate_size:
        raise ValueError(f"model {m.name} is not Qwen3-MoE (needs routed experts and no shared expert)")
    return {**dense_to_hf(m, MODEL_TYPE, ARCHITECTURE), **attention_to_hf(m), **moe_to_hf(m)}
