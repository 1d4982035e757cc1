"""The architecture of a Qwen-family model: the `model` section of every config.

It lives with the families (the lowest layer that knows about models): the runtime, the stages
and the tools import it from here, and nothing here imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

VALUE_HEADS = ("linear", "mlp")
"""Layouts of a reward model's value head (`ModelConfig.value_head`)."""


@dataclass
class ModelConfig:
    """Architecture of a Qwen-family model, in Hugging Face `config.json` terms."""

    name: str = MISSING
    """Registry name, e.g. `qwen3_debug`, `qwen3_8b`."""
    family: str = MISSING
    """One of `qwen2` (also Qwen2.5), `qwen3`, `qwen2_moe`, `qwen3_moe`."""
    num_layers: int = MISSING
    """HF `num_hidden_layers`."""
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    """HF `intermediate_size` (dense MLP)."""
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING
    """HF `num_key_value_heads` (GQA)."""
    head_dim: Optional[int] = None
    """Per-head size; None means hidden_size / num_attention_heads. Qwen3 decouples it."""
    vocab_size: int = 151936
    """Embedding rows (HF `vocab_size`, already padded in the published configs)."""
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    """HF `rms_norm_eps`."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2/2.5)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3)."""
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    """HF `use_sliding_window`; carried through conversion. Megatron runs full attention, so
    converting a model with this set to true is refused (its logits would differ)."""
    sliding_window: Optional[int] = None
    """HF `sliding_window` (window length), carried through conversion."""
    max_window_layers: Optional[int] = None
    """HF `max_window_layers`, carried through conversion."""
    # Mixture of experts (None/0 for dense models).
    num_experts: Optional[int] = None
    """Routed experts per MoE layer."""
    moe_ffn_hidden_size: Optional[int] = None
    """HF `moe_intermediate_size`: each routed expert's hidden size."""
    moe_router_topk: int = 2
    """HF `num_experts_per_tok`."""
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities (HF `norm_topk_prob`)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Qwen2-MoE's shared expert hidden size (None: no shared expert)."""
    moe_shared_expert_gate: bool = False
    """Sigmoid gate on the shared expert output (Qwen2-MoE)."""
    moe_layer_freq: Optional[List[int]] = None
    """Per layer, 1 = MoE, 0 = dense MLP (HF `decoder_sparse_step` / `mlp_only_layers`); None: all MoE."""
    rope_scaling_type: Optional[str] = None
    """RoPE scaling for context extension: None (plain RoPE at rope_theta) or `yarn` (HF
    `rope_scaling.rope_type`)."""
    rope_scaling_factor: float = 1.0
    """HF `rope_scaling.factor`: how far the context is stretched beyond the original length."""
    rope_original_max_position_embeddings: Optional[int] = None
    """HF `rope_scaling.original_max_position_embeddings`: the pretraining context length."""
    yarn_beta_fast: float = 32.0
    """HF `rope_scaling.beta_fast`: YaRN ramp boundary (rotations) above which frequencies are kept."""
    yarn_beta_slow: float = 1.0
    """HF `rope_scaling.beta_slow`: YaRN ramp boundary below which frequencies are fully interpolated."""
    # Value head of a reward model (posttrain.rm / posttrain.prm); a language model ignores these.
    value_head: str = "linear"
    """The value head's layout: `linear`, one hidden -> 1 projection (what posttrain.rm / prm
    train by default), or `mlp`, hidden -> hidden with bias and ReLU before that projection (the
    `score.0` / `score.2` head of Qwen2.5-Math-RM / PRM, HF `Qwen2ForRewardModel` /
    `Qwen2ForProcessRewardModel`). tools.convert sets it from the HF class; it is never written
    into a language model's HF config.json."""
    value_head_bias: bool = False
    """A bias on the value head's final hidden -> 1 projection (Qwen2.5-Math-RM / PRM; a TRL PRM
    whose two class biases differ)."""

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)
