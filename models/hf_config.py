"""HF `config.json` <-> ModelConfig pieces shared by the Qwen families.

Each family module composes these with its own flags. Reading accepts both the published
`config.json` spelling (`rope_theta`, `num_experts`) and transformers 5's (`rope_parameters`,
`num_local_experts`), and accepts a transformers config object as well as a dict. Anything
the Megatron model cannot reproduce (another activation, RoPE scaling other than YaRN, sliding-window
attention switched on) is refused with the field named, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from models.config import ModelConfig
from models import rope


class HFConfigError(ValueError):
    """An HF config that our Megatron model cannot represent exactly."""


def as_dict(hf: Any) -> Dict[str, Any]:
    """A plain dict from a dict or a transformers PretrainedConfig."""
    return dict(hf.to_dict() if hasattr(hf, "to_dict") else hf)


def rope_theta(hf: Dict[str, Any]) -> float:
    """RoPE base from either spelling; RoPE scaling other than YaRN is refused (models.rope)."""
    params = hf.get("rope_parameters") or {}
    rope_scaling_fields(hf)  # refuses scaling types other than YaRN
    # 10000 is transformers' default when a config names no theta.
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def dense_from_hf(hf: Dict[str, Any], family: str, name: str) -> Dict[str, Any]:
    """ModelConfig fields common to every family."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFConfigError(f"hidden_act={act!r} is not supported (Qwen uses silu)")
    if hf.get("use_sliding_window"):
        raise HFConfigError("use_sliding_window=true is not supported: the Megatron model runs full attention")
    heads = hf["num_attention_heads"]
    return dict(
        name=name,
        family=family,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rope_theta=rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        sliding_window=hf.get("sliding_window"),
        max_window_layers=hf.get("max_window_layers"),
        **rope_scaling_fields(hf),
    )


def rope_scaling_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    """ModelConfig RoPE-scaling fields (YaRN) of an HF config; {} for plain RoPE."""
    try:
        return rope.from_hf(hf)
    except rope.RopeScalingError as e:
        raise HFConfigError(str(e)) from None


def dense_to_hf(m: ModelConfig, model_type: str, architecture: str) -> Dict[str, Any]:
    """The published `config.json` fields common to every family."""
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_word_embeddings,
        "use_sliding_window": m.use_sliding_window,
        "sliding_window": m.sliding_window,
        "max_window_layers": m.max_window_layers,
        "attention_dropout": 0.0,
        "rope_scaling": rope.to_hf(m),
    }
    # Unset optional fields are left out so transformers applies its own defaults.
    return {k: v for k, v in config.items() if v is not None}


def head_dim_from_hf(hf: Dict[str, Any]) -> int:
    """Qwen3's head_dim, which its configs always state (it need not be hidden / heads)."""
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def moe_layer_freq(hf: Dict[str, Any], num_layers: int) -> Optional[List[int]]:
    """HF `decoder_sparse_step` / `mlp_only_layers` -> per-layer 1 (MoE) / 0 (dense); None = all MoE.

    HF makes layer i sparse when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    """
    step = hf.get("decoder_sparse_step", 1) or 1
    dense_only = set(hf.get("mlp_only_layers") or [])
    freq = [int(i not in dense_only and (i + 1) % step == 0) for i in range(num_layers)]
    return None if all(freq) else freq


def moe_from_hf(hf: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """Routed-expert ModelConfig fields (shared experts are Qwen2-MoE's own)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not experts:
        raise HFConfigError("a MoE config needs num_experts > 0")
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_topk=hf["num_experts_per_tok"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layer_freq=moe_layer_freq(hf, num_layers),
    )


def moe_to_hf(m: ModelConfig) -> Dict[str, Any]:
    """Routed-expert config.json fields; dense layers are written as `mlp_only_layers`."""
    freq = m.moe_layer_freq or [1] * m.num_layers
    return {
        "num_experts": m.num_experts,
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "num_experts_per_tok": m.moe_router_topk,
        "norm_topk_prob": m.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, f in enumerate(freq) if not f],
    }
