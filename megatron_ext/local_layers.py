"""Layers for Megatron's local (non-Transformer-Engine) spec that add what it lacks on CPU.

- `RMSNorm`: marks its weight `sequence_parallel` so Megatron all-reduces its gradient over
  TP when sequence parallelism is on (Megatron's WrappedTorchNorm refuses SP).
- `CoreAttention`: causal attention (GQA, context parallelism, packed documents) through
  `F.scaled_dot_product_attention` without any [s, s] mask: the plain causal case is one
  `is_causal=True, enable_gqa=True` call (flash / cuDNN kernels on GPUs, the blocked flash
  kernel on CPU), so memory grows linearly with the sequence and nothing is copied per layer.

  Context parallelism: each CP rank holds two chunks of the sequence (chunk r and chunk
  2*CP-1-r, Megatron's load-balanced split); K/V are all-gathered over the CP group (gradients
  reduce-scattered back) and put in sequence order, and each local chunk attends causally to
  the keys up to its own end (a lower-right aligned causal mask, `causal_lower_right`), so
  chunks attend across ranks exactly as one process would.

  Packed sequences (Megatron's `thd` format: `packed_seq_params` with cu_seqlens, batch dim
  squeezed, RoPE restarted per document by Megatron's attention) are document-causal: each
  document is attended on its own, a token seeing only earlier tokens of its document. Under
  CP each document is split like a whole sequence (its chunks r and 2*CP-1-r on rank r,
  `thd_token_positions`), so CP=N equals one process here too. The per-document plan (chunk
  and document sizes, the K/V reordering index) is computed once per micro-batch and reused by
  every layer. q/k/v are cut into documents with `split`, whose backward joins the gradients in
  one concatenation: a slice per document would zero-fill a gradient of the whole packed
  sequence per document, O(documents x tokens) memory traffic (16k tokens in 512 documents, bf16,
  forward+backward of one layer on a 2-core CPU: 1.59 s as slices, 0.27 s as splits).

`megatron_ext.spec` swaps them into the local spec; with Transformer Engine, TE's norm and
attention (incl. its CP implementations) are used instead.

KV-cached generation (`megatron_ext.generation`, Megatron-Core's `StaticInferenceContext`)
hands CoreAttention the cached keys/values: k/v hold every position so far, q only the newest
ones, and the queries attend lower-right causal (a single decode query sees every key, with no
mask and native GQA).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_ext.patches import host_copy


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
    return host_copy(padded if padded is not None else getattr(params, f"cu_seqlens_{which}"))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, heads, sq, hn] attends causally to k/v [b, groups, sk, hn], sk >= sq: the queries are
    the last sq positions of the keys (lower-right aligned; sq == sk is plain causal)."""
    sq, sk = q.shape[-2], k.shape[-2]
    if sq == sk or sq == 1:  # one query (a KV-cached decode step) is the last position: it sees every key
        return F.scaled_dot_product_attention(q, k, v, is_causal=sq > 1, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # torch's lower-right causal kernels take K/V with every query head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk), scale=scale)


@dataclass
class AttentionPlan:
    """How the local tokens of one micro-batch attend, the same for every layer.

    The local queries are cut into consecutive chunks of `q_sizes` tokens, the sequence-ordered
    K/V into documents of `kv_sizes` tokens; chunk i attends causally to the first `spans[i][1]`
    keys of document `spans[i][0]`, which end at the chunk's own last token (lower-right aligned).
    Cutting by `split` (not one slice per chunk) keeps the backward pass linear in the tokens: a
    split's gradient is one concatenation, a slice's a zero-filled gradient of the whole input.
    `kv_order`: under CP, the index that puts the all-gathered K/V (rank-major) into sequence
    order, document by document (None without CP).
    """

    q_sizes: List[int]
    kv_sizes: List[int]
    spans: List[Tuple[int, int]]
    kv_order: Optional[torch.Tensor]


def attention_plan(lengths: List[int], cp_rank: int, cp_size: int, device) -> AttentionPlan:
    """The plan for documents of (padded, global) `lengths` packed back to back, each split
    into 2*CP chunks with chunks r and 2*CP-1-r on CP rank r (a plain sequence is one document)."""
    q_sizes, spans, order = [], [], []
    local_start = 0
    local_total = sum(lengths) // cp_size
    for doc, length in enumerate(lengths):
        n = length // (2 * cp_size)
        if cp_size == 1:
            q_sizes.append(length)
            spans.append((doc, length))
        else:
            for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
                q_sizes.append(n)
                spans.append((doc, (chunk + 1) * n))
            for chunk in range(2 * cp_size):  # where sequence chunk `chunk` sits in the gathered K/V
                rank, second = (chunk, 0) if chunk < cp_size else (2 * cp_size - 1 - chunk, 1)
                start = rank * local_total + local_start + second * n
                order.append(torch.arange(start, start + n))
        local_start += length // cp_size
    kv_order = torch.cat(order).to(device) if order else None
    return AttentionPlan(q_sizes, list(lengths), spans, kv_order)


def _cut(t: torch.Tensor, sizes: List[int]) -> Tuple[torch.Tensor, ...]:
    return t.split(sizes, dim=2) if len(sizes) > 1 else (t,)


def _prefix(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[2] == n else t[:, :, :n]


@functools.lru_cache(maxsize=16)
def _sequence_plan(seq_len_local: int, cp_rank: int, cp_size: int, device) -> AttentionPlan:
    return attention_plan([seq_len_local * cp_size], cp_rank, cp_size, device)


def _packed_plan(params, cp_rank: int, cp_size: int, device) -> AttentionPlan:
    """The plan of a packed micro-batch, kept on its PackedSeqParams (the same object reaches every
    layer of the micro-batch), so it is built once, not per layer, from the host copy of the
    boundaries."""
    plan = getattr(params, "_local_attention_plan", None)
    if plan is None:
        q_cu, kv_cu = _cu(params, "q"), _cu(params, "kv")
        if not torch.equal(q_cu, kv_cu):
            raise NotImplementedError("local CoreAttention: packed sequences need cu_seqlens_q == cu_seqlens_kv")
        lengths = (q_cu[1:] - q_cu[:-1]).tolist()
        for doc, length in enumerate(lengths):
            if length % (2 * cp_size):
                raise ValueError(f"packed document {doc} has length {length}, not a multiple of 2*CP={2 * cp_size}: "
                                 "pad every document to a multiple of 2*CP")
        plan = attention_plan(lengths, cp_rank, cp_size, device)
        params._local_attention_plan = plan
    return plan


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
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn];
        packed (thd): query [t, np, hn], key/value [t, ng, hn] -> [t, np * hn]."""
        if attention_bias is not None:
            raise NotImplementedError("local CoreAttention: attention bias is not supported")
        if attention_mask is not None:
            raise NotImplementedError("local CoreAttention: explicit attention masks are not supported "
                                      "(causal, or document-causal through packed_seq_params)")
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        packed = packed_seq_params is not None
        if packed:
            if getattr(packed_seq_params, "qkv_format", "thd") != "thd":
                raise NotImplementedError(f"local CoreAttention: packed format {packed_seq_params.qkv_format!r} "
                                          "(only thd)")
            plan = _packed_plan(packed_seq_params, cp_rank, cp_size, query.device)
            if sum(plan.q_sizes) != query.shape[0]:
                raise ValueError(f"packed attention: cu_seqlens describe {sum(plan.q_sizes)} local tokens, "
                                 f"the query has {query.shape[0]}")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, 1, heads, hn]
        elif key.shape[0] != query.shape[0]:
            # KV-cached inference (Megatron's StaticInferenceContext): the queries are the newest
            # positions of the cached keys, so they attend lower-right causal to all of them.
            if cp_size > 1 or key.shape[0] < query.shape[0]:
                raise NotImplementedError(f"local CoreAttention: {query.shape[0]} queries over {key.shape[0]} keys "
                                          "(KV-cached inference) needs cp=1 and no more queries than keys")
            plan = AttentionPlan([query.shape[0]], [key.shape[0]], [(0, key.shape[0])], None)
        else:
            plan = _sequence_plan(query.shape[0], cp_rank, cp_size, query.device)
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key = gather_from_sequence_parallel_region(key, True, group).index_select(0, plan.kv_order)
            value = gather_from_sequence_parallel_region(value, True, group).index_select(0, plan.kv_order)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        ks, vs = _cut(k, plan.kv_sizes), _cut(v, plan.kv_sizes)
        outs = [causal_attention(qc, _prefix(ks[doc], n), _prefix(vs[doc], n), self.softmax_scale)
                for qc, (doc, n) in zip(_cut(q, plan.q_sizes), plan.spans)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        out = out.permute(2, 0, 1, 3)  # [s, b, heads, hn]
        return out.reshape(out.shape[0], -1) if packed else out.reshape(out.shape[0], out.shape[1], -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint({}, prefix, {}, sharded_offsets)
