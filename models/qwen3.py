"""Qwen3 dense: per-head RMSNorm on q and k (QK-norm), no QKV bias, `head_dim` independent of
hidden_size / num_attention_heads."""

from __future__ import annotations

from typing import Any, Dict, Optional

from models.config import ModelConfig
from models import mapping as mp
from models.hf_config import HFConfigError, as_dict, dense_from_hf, dense_to_hf, head_dim_from_hf

FAMILY = "qwen3"
MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"

RULES = [mp.EMBEDDING, *mp.ATTENTION, *mp.QK_NORM, *mp.DENSE_MLP, mp.FINAL_NORM, mp.OUTPUT]


def attention_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """Qwen3-style attention (shared with Qwen3-MoE): QK-norm, decoupled head_dim, no bias."""
    if hf.get("attention_bias"):
        # HF's attention_bias also puts a bias on o_proj, which Megatron's add_qkv_bias lacks.
        raise HFConfigError("attention_bias=true is not supported for Qwen3 (it adds an o_proj bias)")
    return dict(head_dim=head_dim_from_hf(hf), qk_norm=True, qkv_bias=False)


def attention_to_hf(m: ModelConfig) -> Dict[str, Any]:
    if m.qkv_bias or not m.qk_norm:
        raise ValueError(f"model {m.name} is not Qwen3-style (needs qk_norm and no qkv_bias)")
    return {"head_dim": m.kv_channels, "attention_bias": False}


def config_from_hf(hf: Any, name: Optional[str] = None) -> ModelConfig:
    """HF Qwen3 config (dict or transformers config) -> ModelConfig."""
    hf = as_dict(hf)
    return ModelConfig(**dense_from_hf(hf, FAMILY, name or "qwen3_hf"), **attention_fields(hf))


def config_to_hf(m: ModelConfig) -> Dict[str, Any]:
    """ModelConfig -> HF Qwen3 `config.json` fields."""
    return {**dense_to_hf(m, MODEL_TYPE, ARCHITECTURE), **attention_to_hf(m)}
