"""Layers for Megatron's local (non-Transformer-Engine) spec that add what it lacks on CPU.

- `RMSNorm`: marks its weight `sequence_parallel` so Megatron all-reduces its gradient over
  TP when sequence parallelism is on (Megatron's WrappedTorchNorm refuses SP).
- `CoreAttention`: causal attention with context parallelism. Each CP rank holds two chunks
  of the sequence (chunk r and chunk 2*CP-1-r, Megatron's load-balanced split); K/V are
  all-gathered over the CP group (gradients reduce-scattered back) and the causal mask is
  built from global positions, so chunks attend across ranks exactly as one process would.

  With packed sequences (Megatron's `thd` format: `packed_seq_params` with cu_seqlens, batch dim
  squeezed, RoPE restarted per document by Megatron's attention) the mask is document-causal:
  a token attends only to earlier tokens of its own document. Under CP each document is split
  like a whole sequence (its chunks r and 2*CP-1-r on rank r, `thd_token_positions`), so the
  gathered K/V carry (document, position) labels and CP=N masks equal the single-process ones.

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


def thd_token_positions(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int):
    """(document id, position in document, index in the full pack) of each token a CP rank holds
    of a packed sequence with (padded) boundaries `cu_seqlens`; every document length must be a
    multiple of 2*CP. Rank r holds, document by document, chunks r and 2*CP-1-r of it."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    docs, positions, index = [], [], []
    for doc, (start, end) in enumerate(zip(bounds, bounds[1:])):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"packed document {doc} has length {length}, not a multiple of 2*CP={2 * cp_size}: "
                             "pad every document to a multiple of 2*CP")
        pos = cp_chunk_positions(length // cp_size, cp_rank, cp_size)
        docs.append(torch.full_like(pos, doc))
        positions.append(pos)
        index.append(pos + start)
    return torch.cat(docs), torch.cat(positions), torch.cat(index)


def _cu(params, which: str) -> torch.Tensor:
    padded = getattr(params, f"cu_seqlens_{which}_padded", None)
    return (padded if padded is not None else getattr(params, f"cu_seqlens_{which}")).cpu()


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
        if attention_bias is not None:
            raise NotImplementedError("local CoreAttention: attention bias is not supported")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params)
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

    def _forward_packed(self, query, key, value, params):
        """thd: query [t, np, hn], key/value [t, ng, hn] -> [t, np * hn], document-causal."""
        if getattr(params, "qkv_format", "thd") != "thd":
            raise NotImplementedError(f"local CoreAttention: packed format {params.qkv_format!r} (only thd)")
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        q_doc, q_pos, _ = thd_token_positions(_cu(params, "q"), cp_rank, cp_size)
        if q_doc.numel() != query.shape[0]:
            raise ValueError(f"packed attention: cu_seqlens describe {q_doc.numel()} local tokens, "
                             f"the query has {query.shape[0]}")
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key = gather_from_sequence_parallel_region(key, True, group)
            value = gather_from_sequence_parallel_region(value, True, group)
            labels = [thd_token_positions(_cu(params, "kv"), r, cp_size) for r in range(cp_size)]
            k_doc, k_pos = torch.cat([d for d, _, _ in labels]), torch.cat([p for _, p, _ in labels])
        else:
            k_doc, k_pos, _ = thd_token_positions(_cu(params, "kv"), 0, 1)
        mask = (k_doc.unsqueeze(0) == q_doc.unsqueeze(1)) & (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1))
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))  # [1, heads, t, hn]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), scale=self.softmax_scale)
        return out.squeeze(0).permute(1, 0, 2).reshape(query.shape[0], -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint({}, prefix, {}, sharded_offsets)
