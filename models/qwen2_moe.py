"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (QKV bias), routed experts with
softmax top-k (`norm_topk_prob` picks renormalised or not), one shared expert with its own
intermediate size scaled by a sigmoid gate, dense layers from `decoder_sparse_step` /
`mlp_only_layers`."""

from __future__ import annotations

from typing import Any, Dict, Optional

from models.config import ModelConfig
from models import mapping as mp
from models.hf_config import HFConfigError, as_dict, dense_from_hf, dense_to_hf, moe_from_hf, moe_to_hf

FAMILY = "qwen2_moe"
MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"

RULES = [mp.EMBEDDING, *mp.ATTENTION, *mp.QKV_BIAS, *mp.DENSE_MLP, *mp.ROUTER, *mp.ROUTED_EXPERTS,
         *mp.SHARED_EXPERT, mp.FINAL_NORM, mp.OUTPUT]


def config_from_hf(hf: Any, name: Optional[str] = None) -> ModelConfig:
    """HF Qwen2-MoE config (dict or transformers config) -> ModelConfig."""
    hf = as_dict(hf)
    dense = dense_from_hf(hf, FAMILY, name or "qwen2_moe_hf")
    shared = hf.get("shared_expert_intermediate_size")
    if not shared:
        raise HFConfigError("Qwen2-MoE needs shared_expert_intermediate_size > 0")
    return ModelConfig(
        **dense,
        **moe_from_hf(hf, dense["num_layers"]),
        # transformers 5 names the bias switch `qkv_bias`; published configs omit it (always on).
        qkv_bias=bool(hf.get("qkv_bias", True)),
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=True,
    )


def config_to_hf(m: ModelConfig) -> Dict[str, Any]:
    """ModelConfig -> HF Qwen2-MoE `config.json` fields."""
    if not (m.is_moe and m.moe_shared_expert_intermediate_size and m.moe_shared_expert_gate) or m.qk_norm:
        raise ValueError(f"model {m.name} is not Qwen2-MoE (needs experts and a gated shared expert, no qk_norm)")
    if not m.qkv_bias:
        raise ValueError(f"model {m.name}: Qwen2-MoE checkpoints always carry a QKV bias")
    return {**dense_to_hf(m, MODEL_TYPE, ARCHITECTURE), **moe_to_hf(m),
            "shared_expert_intermediate_size": m.moe_shared_expert_intermediate_size}
