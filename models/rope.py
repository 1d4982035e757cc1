"""RoPE scaling for context extension (YaRN), on Megatron-Core's own YarnRotaryEmbedding.

HF `rope_scaling = {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": L,
"beta_fast": 32, "beta_slow": 1}` maps to ModelConfig `rope_scaling_type="yarn"`,
`rope_scaling_factor`, `rope_original_max_position_embeddings`, `yarn_beta_fast/slow`.

Two details make the Megatron model equal transformers':
- Megatron's YarnRotaryEmbedding computes the same blended inverse frequencies as HF (with the
  correction range rounded to integers, HF's default `truncate=True`), but returns
  `(emb, mscale)`; the GPT model's plain-RoPE path expects the embedding alone, so it is
  wrapped (`_EmbeddingOnly`).
- HF multiplies cos and sin by the attention factor `0.1 * ln(factor) + 1`, which scales every
  q.k product by its square. Megatron's GPT path drops that factor, so the attention's softmax
  scale is multiplied by it instead (identical logits, no change to q/k).

`apply_rope_scaling(chunk, model_cfg)` does both on a built GPTModel chunk; it is a no-op for
plain RoPE (where `rope_theta` alone sets the base, e.g. raised 10k -> 1M for long context).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

from models.config import ModelConfig


class RopeScalingError(ValueError):
    """An HF rope_scaling this model cannot reproduce."""


def attention_factor(factor: float) -> float:
    """YaRN's attention (concentration) factor for a context stretch `factor` (HF default)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


class _EmbeddingOnly(torch.nn.Module):
    """Adapts YarnRotaryEmbedding (returns (emb, mscale)) to the plain-RoPE call sites."""

    def __init__(self, yarn: YarnRotaryEmbedding):
        super().__init__()
        self.yarn = yarn

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.yarn.get_rotary_seq_len(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.yarn(*args, **kwargs)[0]


def apply_rope_scaling(chunk: torch.nn.Module, m: ModelConfig) -> None:
    """Swap YaRN into a built GPTModel chunk when `m.rope_scaling_type == "yarn"` (see module doc)."""
    if m.rope_scaling_type is None:
        return
    if m.rope_scaling_type != "yarn":
        raise RopeScalingError(f"model.rope_scaling_type={m.rope_scaling_type!r}: only 'yarn' is supported")
    old = getattr(chunk, "rotary_pos_emb", None)
    if old is None:
        raise RopeScalingError("apply_rope_scaling: this model chunk has no rotary_pos_emb to replace")
    yarn = YarnRotaryEmbedding(
        kv_channels=chunk.config.kv_channels, rotary_base=m.rope_theta, scaling_factor=m.rope_scaling_factor,
        original_max_position_embeddings=m.rope_original_max_position_embeddings, beta_fast=m.yarn_beta_fast,
        beta_slow=m.yarn_beta_slow, mscale=None, mscale_all_dim=None, correction_range_round_to_int=True,
        use_cpu_initialization=chunk.config.use_cpu_initialization, cp_group=getattr(old, "cp_group", None))
    chunk.rotary_pos_emb = _EmbeddingOnly(yarn)
    scale = attention_factor(m.rope_scaling_factor) ** 2
    attentions = [mod for name, mod in chunk.named_modules() if name.endswith("core_attention")]
    for mod in attentions:
        if not isinstance(getattr(mod, "softmax_scale", None), float):
            raise RopeScalingError(f"YaRN: {type(mod).__name__} has no float softmax_scale to apply the "
                                   "attention factor to (the local CPU attention has one)")
        mod.softmax_scale *= scale


def from_hf(hf: Dict[str, Any]) -> Dict[str, Any]:
    """ModelConfig RoPE-scaling fields from an HF config (`rope_scaling` or transformers 5's
    `rope_parameters`); {} for plain RoPE."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {}
    if kind != "yarn":
        raise RopeScalingError(f"rope scaling type {kind!r} is not supported (plain RoPE or yarn)")
    unsupported = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k) is not None}
    if unsupported or params.get("truncate", True) is False:
        raise RopeScalingError(f"yarn options {unsupported or {'truncate': False}} are not supported "
                               "(only factor, original_max_position_embeddings, beta_fast, beta_slow)")
    original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if not original:
        raise RopeScalingError("yarn rope_scaling needs original_max_position_embeddings")
    return dict(rope_scaling_type="yarn", rope_scaling_factor=float(params["factor"]),
                rope_original_max_position_embeddings=int(original),
                yarn_beta_fast=float(params.get("beta_fast", 32.0)), yarn_beta_slow=float(params.get("beta_slow", 1.0)))


def to_hf(m: ModelConfig) -> Optional[Dict[str, Any]]:
    """The HF `rope_scaling` dict for a ModelConfig (None for plain RoPE)."""
    if m.rope_scaling_type is None:
        return None
    return {"rope_type": "yarn", "factor": m.rope_scaling_factor,
            "original_max_position_embeddings": m.rope_original_max_position_embeddings,
            "beta_fast": m.yarn_beta_fast, "beta_slow": m.yarn_beta_slow}
