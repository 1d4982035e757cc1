"""The local spec's core attention (megatron_ext.local_layers.CoreAttention) against a naive
reference that builds the full mask from (document, position) labels: outputs and gradients for
plain causal with GQA, packed documents (thd), CP=2 and thd + CP=2; and no [s, s] tensor anywhere."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.forked_ranks import run_on_ranks

HEADS, GROUPS, DIM = 4, 2, 16
SCALE = 1.0 / math.sqrt(DIM)


def _reference(q, k, v, doc, pos):
    """Masked softmax attention from labels: a token attends to earlier tokens of its document.
    q [s, b, heads, hn], k/v [s, b, groups, hn] -> [s, b, heads * hn]."""
    mask = (doc[None, :] == doc[:, None]) & (pos[None, :] <= pos[:, None])
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    k, v = (t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * SCALE
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.permute(2, 0, 1, 3).flatten(2)


def _inputs(seq, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(seq, batch, n, DIM, generator=gen) for n in (HEADS, GROUPS, GROUPS)] + \
        [torch.randn(seq, batch, HEADS * DIM, generator=gen)]


def _attention():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.local_layers import CoreAttention
    from megatron_ext.transformer import transformer_config
    from megatron_ext.cli import load_config

    tcfg = transformer_config(load_config(["model=qwen3_debug"]))
    return CoreAttention(tcfg, 1, AttnMaskType.causal, "self", softmax_scale=SCALE)


def _compare_cases(rank, world_size):
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config

    init_parallel(load_config([f"parallel.cp={world_size}", "model=qwen3_debug"]))
    return {name: _compare(world_size, cu, batch) for name, (cu, batch) in CASES.items()}


def _compare(world_size, cu_seqlens, batch, device="cpu", dtype=torch.float32):
    """This rank's output and q/k/v gradients against the reference's at the tokens it holds
    (the reference in fp32, ours in `dtype`, both on `device`)."""
    from megatron.core import parallel_state

    from megatron_ext.data import packed_seq_params
    from megatron_ext.local_layers import cp_chunk_positions, thd_token_positions

    seq = int(cu_seqlens[-1])
    q, k, v, upstream = (t.to(device) for t in _inputs(seq, batch))
    doc, pos, _ = (t.to(device) for t in thd_token_positions(cu_seqlens, 0, 1))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_in, doc, pos)
    ref.backward(upstream)
    cp_rank = parallel_state.get_context_parallel_rank()
    packed = len(cu_seqlens) > 2
    if packed:
        index = thd_token_positions(cu_seqlens, cp_rank, world_size)[2].to(device)
        local = [t[index, 0].to(dtype).requires_grad_() for t in (q, k, v)]
        params = packed_seq_params(cu_seqlens.to(device))
        out = _attention()(*local, None, packed_seq_params=params)
        out.backward(upstream[index, 0].to(dtype))
        want, got = [ref[index, 0]] + [t.grad[index, 0] for t in ref_in], [out] + [t.grad for t in local]
    else:
        index = cp_chunk_positions(seq // world_size, cp_rank, world_size).to(device)
        local = [t[index].to(dtype).requires_grad_() for t in (q, k, v)]
        out = _attention()(*local, None)
        out.backward(upstream[index].to(dtype))
        want, got = [ref[index]] + [t.grad[index] for t in ref_in], [out] + [t.grad for t in local]
    assert all(g.dtype == dtype and g.device.type == torch.device(device).type for g in got)
    return [(w - g.float()).abs().max().item() for w, g in zip(want, got)]


CASES = {
    "causal_gqa": (torch.tensor([0, 48]), 2),
    "thd": (torch.tensor([0, 8, 20, 32, 48]), 1),
}


@pytest.mark.parametrize("cp", [1, 2])
def test_equals_masked_reference(cp):
    for rank, results in enumerate(run_on_ranks(_compare_cases, cp)):
        for name, diffs in results.items():
            assert max(diffs) < 1e-5, (cp, rank, name, diffs)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (what a materialised [s, s] mask would be)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(rank, world_size, seq):
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.data import packed_seq_params

    init_parallel(load_config(["model=qwen3_debug"]))
    q, k, v, upstream = _inputs(seq, 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sizes = {}
    for name, kwargs, args in (("causal", {}, (q, k, v)),
                               ("thd", {"packed_seq_params": packed_seq_params(torch.tensor([0, seq // 2, seq]))},
                                (q[:, 0], k[:, 0], v[:, 0]))):
        with _LargestTensor() as mode:
            out = _attention()(*args, None, **kwargs)
            out.backward(upstream.reshape(out.shape))
        sizes[name] = mode.largest
    return sizes


def test_no_sequence_squared_tensor():
    """Forward and backward at s=2048 create nothing near s*s elements (4M): memory is linear in s."""
    seq = 2048
    (sizes,) = run_on_ranks(_largest_tensor, 1, seq)
    for name, largest in sizes.items():
        assert largest <= seq * HEADS * DIM, (name, largest)


class _Produced(TorchDispatchMode):
    """Counts the elements of every tensor that a non-view op produces (memory written)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel()
        return out


def _backward_elements(rank, world_size, seq, doc_counts):
    """Per count of equal packed documents: elements written by the backward pass of this rank's
    attention, per element of its q."""
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.data import packed_seq_params
    from megatron_ext.local_layers import thd_token_positions

    init_parallel(load_config([f"parallel.cp={world_size}", "model=qwen3_debug"]))
    written = {}
    for docs in doc_counts:
        cu = torch.arange(0, seq + 1, seq // docs)
        q, k, v, upstream = _inputs(seq, 1)
        index = thd_token_positions(cu, rank, world_size)[2]
        q, k, v = (t[index, 0].requires_grad_() for t in (q, k, v))
        out = _attention()(q, k, v, None, packed_seq_params=packed_seq_params(cu))
        with _Produced() as mode:
            out.backward(upstream[index, 0].reshape(out.shape))
        written[docs] = mode.total / q.numel()
    return written


@pytest.mark.parametrize("cp", [1, 2])
def test_packed_backward_is_linear_in_tokens(cp):
    """The backward pass of packed attention writes about as much for 128 documents as for 2: the
    per-document pieces of q/k/v are cut so that their gradients are joined once, not each
    zero-filled to the whole packed sequence (O(documents x tokens) memory traffic)."""
    for written in run_on_ranks(_backward_elements, cp, 2048, [2, 128]):
        assert written[128] < 1.5 * written[2], written


def _device_boundaries_unread(rank, world_size):
    """Packed attention whose PackedSeqParams hold the boundaries on a device that cannot be read
    (meta) with their host copy attached, as `packed_seq_params` builds them on GPUs: outputs
    and gradients equal those from host boundaries."""
    import dataclasses

    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.data import packed_seq_params

    init_parallel(load_config(["model=qwen3_debug"]))
    cu = torch.tensor([0, 8, 20, 32, 48], dtype=torch.int32)
    on_device = cu.to("meta")
    on_device.host_copy = cu
    host = packed_seq_params(cu)
    device = dataclasses.replace(host, **{f.name: on_device for f in dataclasses.fields(host)
                                          if f.name.startswith("cu_seqlens")})
    q, k, v, upstream = (t[:, 0] for t in _inputs(48, 1))
    results = []
    for params in (host, device):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _attention()(*inputs, None, packed_seq_params=params)
        out.backward(upstream)
        results.append([out] + [t.grad for t in inputs])
    return all(torch.equal(a, b) for a, b in zip(*results))


def test_packed_attention_reads_boundaries_from_their_host_copy():
    assert run_on_ranks(_device_boundaries_unread, 1) == [True]
