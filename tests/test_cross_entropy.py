"""megatron_ext.cross_entropy against Megatron-Core's vocab_parallel_cross_entropy: loss and
logit gradients in fp32 at TP=1 and TP=2 (several row blocks, targets on either rank), and bf16
logits keep a bf16 gradient close to the fp32 one."""

from __future__ import annotations

import pytest
import torch

from tests.forked_ranks import run_on_ranks

SEQ, BATCH, VOCAB = 12, 3, 40


def _compare(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_ext import cross_entropy
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config

    init_parallel(load_config([f"parallel.tp={world_size}"]))
    cross_entropy.BLOCK_ELEMENTS = 5 * VOCAB  # several blocks, the last one short
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(SEQ, BATCH, VOCAB, generator=gen) * 3
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=gen)
    upstream = torch.rand(SEQ, BATCH, generator=gen)
    part = VOCAB // world_size
    local = full[..., rank * part:(rank + 1) * part]
    results = {}
    for name, fn in (("ours", cross_entropy.vocab_parallel_cross_entropy),
                     ("megatron", tensor_parallel.vocab_parallel_cross_entropy)):
        logits = local.clone().requires_grad_()
        loss = fn(logits, target)
        loss.backward(upstream)
        results[name] = (loss.detach(), logits.grad)
    bf16 = local.to(torch.bfloat16).requires_grad_()
    loss = cross_entropy.vocab_parallel_cross_entropy(bf16, target)
    loss.backward(upstream)
    results["bf16"] = (loss.detach(), bf16.grad)
    assert parallel_state.get_tensor_model_parallel_world_size() == world_size
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_equals_megatron_cross_entropy(tp):
    for results in run_on_ranks(_compare, tp):
        (loss, grad), (ref_loss, ref_grad) = results["ours"], results["megatron"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
        bf16_loss, bf16_grad = results["bf16"]
        assert bf16_grad.dtype == torch.bfloat16
        torch.testing.assert_close(bf16_loss, ref_loss, rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(bf16_grad.float(), ref_grad, rtol=2e-2, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_eager_forms_equal_the_compiled_functions_bit_for_bit(dtype):
    """The CPU (eager) path runs in-place forms of the two functions compiled on GPUs: the same
    operations in the same order, so the same bits, in fp32 and from bf16 logits."""
    from megatron_ext import cross_entropy as ce

    gen = torch.Generator().manual_seed(1)
    rows, vocab = 9, 50
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    row_max = logits.max(dim=-1).values.float()
    lse = ce._sum_exp(logits, row_max).log() + row_max
    index = torch.randint(0, vocab, (rows,), generator=gen)
    held = torch.rand(rows, generator=gen) > 0.3
    grad_rows = torch.rand(rows, generator=gen)
    assert held.any() and not held.all()
    assert torch.equal(ce._sum_exp_eager(logits, row_max), ce._sum_exp(logits, row_max))
    eager = ce._logit_grad_eager(logits, lse, index, held, grad_rows)
    assert eager.dtype == dtype
    assert torch.equal(eager, ce._logit_grad(logits, lse, index, held, grad_rows))
