"""GPU checks of the local spec's own kernels, which need no Transformer Engine (`pytest -m gpu`):
the CPU tests' references, run on the GPU's kernels (SDPA's flash / cuDNN / memory-efficient
attention, `torch._grouped_mm` on Hopper, the blockwise cross-entropy over a Qwen-sized vocabulary)
in fp32 and bf16; and training with the full-iteration CUDA graph (train.cuda_graph) against
the eager schedule. Skipped without a CUDA GPU."""

import pytest
import torch

from tests.gloo import run_on_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# bf16 keeps 8 bits of mantissa: outputs and gradients of O(1) agree to a few 1e-2.
BF16_TOL = 4e-2


def _all_checks(rank, world_size, device="cuda"):
    checks = dict(attention=_attention_on_gpu, experts=_experts_on_gpu, cross_entropy=_cross_entropy_on_gpu,
                  rope=_rope_on_gpu)
    return {name: check(rank, world_size, device) for name, check in checks.items()}


@pytest.fixture(scope="module")
def on_gpu():
    """Every check below, run in one spawned process: start-up and kernel compilation are paid
    once, not per test."""
    (results,) = run_on_ranks(_all_checks, 1)
    return results


def _attention_on_gpu(rank, world_size, device="cuda"):
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from tests.test_attention import CASES, _compare

    init_parallel(load_config(["model=qwen3_debug"]))
    return {(name, str(dtype)): _compare(1, cu, batch, device, dtype)
            for name, (cu, batch) in CASES.items() for dtype in (torch.float32, torch.bfloat16)}


def test_local_attention_equals_masked_reference_on_gpu(on_gpu):
    results = on_gpu["attention"]
    for (name, dtype), diffs in results.items():
        assert max(diffs) < (1e-4 if dtype == "torch.float32" else BF16_TOL), (name, dtype, diffs)


def _experts_on_gpu(rank, world_size, device="cuda"):
    """Loss and gradients of the 2-layer MoE debug model, bf16 on the GPU, with experts one by
    one (SequentialMLP) and as grouped GEMMs, from the same seed."""
    from tests.test_grouped_experts import GROUPED, SEQUENTIAL, _build, _named_grads

    results = {}
    for impl in (SEQUENTIAL, GROUPED):
        chunk = _build([impl, "precision=bf16", "model.hidden_size=256", "model.ffn_hidden_size=512",
                        "model.moe_ffn_hidden_size=128", "model.num_experts=8"]).bfloat16()
        tokens = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(7)).to(device)
        loss = chunk(tokens, torch.arange(32, device=device)[None], None, labels=tokens)
        loss.float().mean().backward()
        results[impl] = (loss.detach().float().cpu(), {k: g.float().cpu() for k, g in _named_grads(chunk).items()})
    return results


def test_grouped_experts_equal_sequential_mlp_on_gpu(on_gpu):
    from tests.test_grouped_experts import GROUPED, SEQUENTIAL

    results = on_gpu["experts"]
    (ref_loss, ref_grads), (loss, grads) = results[SEQUENTIAL], results[GROUPED]
    assert ref_grads.keys() == grads.keys()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name, g in ref_grads.items():
        scale = g.abs().max().item() or 1.0
        assert (grads[name] - g).abs().max().item() <= BF16_TOL * scale, name


def _cross_entropy_on_gpu(rank, world_size, device="cuda"):
    from megatron.core import tensor_parallel

    from megatron_ext import cross_entropy
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config

    init_parallel(load_config([]))
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 151936, 96
    logits = (torch.randn(rows, 2, vocab, generator=gen) * 3).to(device)
    target = torch.randint(0, vocab, (rows, 2), generator=gen).to(device)
    upstream = torch.rand(rows, 2, generator=gen).to(device)
    out = {}
    for name, fn, dtype in (("megatron", tensor_parallel.vocab_parallel_cross_entropy, torch.float32),
                            ("ours", cross_entropy.vocab_parallel_cross_entropy, torch.float32),
                            ("ours_bf16", cross_entropy.vocab_parallel_cross_entropy, torch.bfloat16)):
        x = logits.to(dtype, copy=True).requires_grad_()
        loss = fn(x, target)
        loss.backward(upstream)
        out[name] = (loss.detach().float().cpu(), x.grad.float().cpu(), x.grad.dtype)
    return out


def test_blockwise_cross_entropy_on_gpu(on_gpu):
    out = on_gpu["cross_entropy"]
    (ref_loss, ref_grad, _), (loss, grad, _), (bf_loss, bf_grad, bf_dtype) = (
        out["megatron"], out["ours"], out["ours_bf16"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert bf_dtype == torch.bfloat16
    torch.testing.assert_close(bf_loss, ref_loss, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(bf_grad, ref_grad, rtol=2e-2, atol=5e-3)


def _rope_on_gpu(rank, world_size, device="cuda"):
    """Megatron's RoPE as patched (cos/sin tables once, the rotation compiled on a GPU) against its
    own eager function, queries and keys shaped as in qwen2_5_1_5b, forward and backward."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_ext import patches

    patches.apply()
    patched = rope_utils._apply_rotary_pos_emb_bshd
    eager = getattr(patched, "__wrapped__", patched)
    gen = torch.Generator().manual_seed(0)
    freqs = torch.rand(4096, 1, 1, 128, generator=gen).mul(4096).to(device)
    diffs = {}
    for heads in (12, 2):
        x = torch.randn(4096, 2, heads, 128, generator=gen).to(device, torch.bfloat16)
        upstream = torch.randn(x.shape, generator=gen).to(device, torch.bfloat16)
        results = []
        for fn in (eager, patched):
            t = x.clone().requires_grad_()
            out = fn(t, freqs)
            out.backward(upstream)
            results += [out.float(), t.grad.float()]
        diffs[heads] = [(results[i] - results[i + 2]).abs().max().item() for i in (0, 1)]
    return patched is not eager, diffs


def test_rope_tables_equal_megatron_rope_on_gpu(on_gpu):
    compiled, diffs = on_gpu["rope"]
    assert compiled, "the patch replaces Megatron's unfused RoPE"
    assert all(d < BF16_TOL * 4 for pair in diffs.values() for d in pair), diffs


def _train_losses(rank, world_size):
    """Losses and gradient norms of 6 steps of the tiny Qwen2 model on synthetic tokens, eager and
    with train.cuda_graph (2 eager steps, then the capture, then replays), in one process (the
    kernels compile once); and whether each run captured a full-iteration CUDA graph."""
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from tools.bench_train import make_stage

    runs = []
    for cuda_graph in ("false", "true"):
        cfg = load_config(["model=qwen2_debug", "model.num_layers=4", "model.vocab_size=2048", "precision=bf16",
                           "data.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=4",
                           "train.steps=6", "train.warmup_steps=1", f"train.cuda_graph={cuda_graph}"])
        validate(cfg, world_size)
        result = train(cfg, make_stage(cfg, "synthetic"))
        graphed = result.runtime.graphed_forward_backward
        captured = graphed is not None and graphed.cuda_graph["training"] is not None
        runs.append(([h["loss"] for h in result.history], [h["grad_norm"] for h in result.history], captured))
    return runs


def test_full_iteration_cuda_graph_trains_as_eager():
    """train.cuda_graph: the replayed graph trains the same steps as the eager schedule (same
    losses and gradient norms up to the nondeterminism of atomics in bf16 kernels)."""
    ((eager, graphed),) = run_on_ranks(_train_losses, 1)
    assert not eager[2] and graphed[2], "the graph run captured a graph, the eager one did not"
    assert len(graphed[0]) == len(eager[0]) == 6
    for a, b in zip(graphed[0] + graphed[1], eager[0] + eager[1]):
        assert a == pytest.approx(b, rel=2e-2, abs=1e-3), (graphed, eager)
    assert graphed[0][-1] < graphed[0][0]
