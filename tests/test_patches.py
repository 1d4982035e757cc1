"""The Megatron-Core correctness patches still match the upstream code they patch."""

import pytest
import torch

from megatron_ext import patches


def test_upstream_call_sites_unchanged():
    sites = patches.upstream_call_sites()
    assert sorted(sites) == sorted(p.__name__ for p in patches.PATCHES)
    for name, present in sites.items():
        assert present, f"upstream changed under patch '{name}': re-check megatron_ext/patches.py"


def test_patches_refuse_other_megatron_versions(monkeypatch):
    import megatron.core

    monkeypatch.setattr(patches, "_applied", False)
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match="pinned to megatron-core 0.16.1, found 0.17.0"):
        patches.apply()


def _gating_without_then_with(rank, world_size):
    """In a fresh process: the MoE router's gating GEMM without TE, before and after the patches."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):  # TE imported here: take the machine without it
        del moe_utils.te_general_gemm
    inp = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    try:
        moe_utils.router_gating_linear(inp, weight, None, torch.float32)
        error = None
    except NameError as e:
        error = str(e)
    patches.apply()
    out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    out.square().sum().backward()
    inp_ref, w_ref = inp.detach().requires_grad_(), weight.detach().requires_grad_()
    ref = inp_ref @ w_ref.t()
    ref.square().sum().backward()
    same_grads = torch.allclose(inp.grad, inp_ref.grad) and torch.allclose(weight.grad, w_ref.grad)
    return error, torch.allclose(out, ref), same_grads


def test_te_general_gemm_patch_lets_the_router_run_without_transformer_engine():
    from tests.gloo import run_on_ranks

    ((error, same_output, same_grads),) = run_on_ranks(_gating_without_then_with, 1)
    assert error == "name 'te_general_gemm' is not defined", "upstream no longer needs the te_general_gemm patch"
    assert same_output and same_grads


def _accumulated_weight_grads(rank, world_size):
    """Megatron's ColumnParallelLinear with gradient_accumulation_fusion (the patch's stand-in for
    Apex) over two micro-batches, against plain autograd."""
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.transformer import transformer_config

    cfg = load_config([])
    init_parallel(cfg)  # applies the patches
    tcfg = transformer_config(cfg)
    tcfg.gradient_accumulation_fusion = True
    layer = ColumnParallelLinear(8, 6, config=tcfg, init_method=torch.nn.init.normal_, bias=False,
                                 gather_output=True)
    layer.weight.main_grad = torch.zeros_like(layer.weight)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(5, 2, 8, generator=gen) for _ in range(2)]
    for x in inputs:
        layer(x)[0].square().sum().backward()
    weight = layer.weight.detach().clone().requires_grad_()
    for x in inputs:
        (x @ weight.t()).square().sum().backward()
    return layer.weight.main_grad, layer.weight.grad, weight.grad


def test_wgrad_accumulation_fusion_accumulates_into_main_grad():
    from tests.gloo import run_on_ranks

    ((main_grad, param_grad, reference),) = run_on_ranks(_accumulated_weight_grads, 1)
    assert param_grad is None  # nothing left for the DDP hook to add a second time
    torch.testing.assert_close(main_grad, reference, rtol=1e-6, atol=1e-6)


def test_wgrad_stand_in_bf16_inputs_fp32_buffer(monkeypatch):
    """Mixed dtypes (bf16 activations, fp32 buffer): the GEMM-and-add fallback (CPU has no
    addmm(out_dtype)) accumulates the same sum."""
    monkeypatch.setattr(patches._WgradAccumulation, "mixed_dtype_gemm", False)
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(7, 4, generator=gen), torch.randn(7, 3, generator=gen)
    main_grad = torch.ones(3, 4)
    patches._WgradAccumulation.wgrad_gemm_accum_fp32(x.bfloat16(), g.bfloat16(), main_grad)
    torch.testing.assert_close(main_grad, 1 + g.bfloat16().float().t() @ x.bfloat16().float(), rtol=1e-2, atol=1e-2)
