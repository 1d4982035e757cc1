"""The Megatron-Core correctness patches still match the upstream code they patch."""

import pytest

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
