"""Layers for Megatron's local (non-Transformer-Engine) spec that add what it lacks on CPU.

- `RMSNorm`: marks its weight `sequence_parallel` so Megatron all-reduces its gradient over
  TP when sequence parallelism is on (Megatron's WrappedTorchNorm refuses SP).
- `CoreAttention`: causal attention with context parallelism. Each CP rank holds two chunks
  of the sequence (chunk r and chunk 2*CP-1-r, Megatron's load-balanced split); K/V are
  all-gathered over the CP group (gradients reduce-scattered back) and the causal mask is
  built from global positions, so chunks attend across ranks exactly as one process would.

`megatron_ext.spec` swaps them into the local spec; with Transformer Engine, TE's norm and
attention (incl. its CP implementations) are used instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim; weight flagged for the TP grad all-reduce under SP."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Each TP rank normalises a different slice of the sequence, so the weight's
        # gradient is partial per rank; finalize_model_grads sums it over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def cp_chunk_positions(seq_len_local: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global positions of the tokens a CP rank holds (Megatron's 2*CP load-balanced split)."""
    if cp_size == 1:
        return torch.arange(seq_len_local)
    chunk = seq_len_local // 2
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


class CoreAttention(MegatronModule):
    """Scaled dot-product attention (causal, GQA) with all-gather context parallelism."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"local CoreAttention supports causal masks only, got {attn_mask_type}")
        if config.attention_dropout:
            raise NotImplementedError("local CoreAttention has no attention dropout (Qwen uses none)")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("local CoreAttention: packed sequences / attention bias not supported")
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        q_pos = cp_chunk_positions(query.shape[0], cp_rank, cp_size)
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key = gather_from_sequence_parallel_region(key, True, group)
            value = gather_from_sequence_parallel_region(value, True, group)
            k_pos = torch.cat([cp_chunk_positions(query.shape[0], r, cp_size) for r in range(cp_size)])
        else:
            k_pos = q_pos
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [sq, sk], True = may attend
        if attention_mask is not None:  # Megatron convention: True = masked out; [b, 1, sq, sk]
            mask = mask & ~attention_mask
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), scale=self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint({}, prefix, {}, sharded_offsets)
