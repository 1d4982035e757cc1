"""Qwen2 / Qwen2.5 dense: QKV bias (and no other bias), RMSNorm, SwiGLU, RoPE, GQA, tied
embeddings on the small sizes (0.5B, 1.5B, 3B), sliding-window fields carried through."""

from __future__ import annotations

from typing import Any, Dict, Optional

from models.config import ModelConfig
from models import mapping as mp
from models.hf_config import as_dict, dense_from_hf, dense_to_hf

FAMILY = "qwen2"
MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"

RULES = [mp.EMBEDDING, *mp.ATTENTION, *mp.QKV_BIAS, *mp.DENSE_MLP, mp.FINAL_NORM, mp.OUTPUT]


def config_from_hf(hf: Any, name: Optional[str] = None) -> ModelConfig:
    """HF Qwen2 config (dict or transformers config) -> ModelConfig."""
    hf = as_dict(hf)
    # Qwen2's q/k/v projections always carry a bias; its head size is always hidden / heads.
    return ModelConfig(**dense_from_hf(hf, FAMILY, name or "qwen2_hf"), qkv_bias=True)


def config_to_hf(m: ModelConfig) -> Dict[str, Any]:
    """ModelConfig -> HF Qwen2 `config.json` fields."""
    if not m.qkv_bias or m.qk_norm or m.head_dim not in (None, m.hidden_size // m.num_attention_heads):
        raise ValueError(f"model {m.name} is not a Qwen2 model (needs qkv_bias, no qk_norm, derived head_dim)")
    return dense_to_hf(m, MODEL_TYPE, ARCHITECTURE)
