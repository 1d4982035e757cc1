"""Grouped-GEMM experts (megatron_ext.grouped_experts) against Megatron's SequentialMLP, fp32 on CPU.

Same numbers (outputs and gradients) from the same weights at EP=1, EP=2 and EP=2+ETP=2, the
same checkpoint entries, checkpoints and optimizer state interchangeable in both directions,
and a number of matmuls per MoE layer that does not depend on the number of experts.
"""

import math

import pytest
import torch

from megatron_ext.cli import load_config
from megatron_ext.config import ConfigError, grouped_gemm_enabled, validate
from tests.forked_ranks import run_on_ranks

MOE = ["model=qwen3_moe_debug", "data.seq_length=32", "train.micro_batch_size=1"]
SEQUENTIAL, GROUPED = "moe.grouped_gemm=false", "moe.grouped_gemm=true"


def _build(overrides):
    """This rank's model chunk, built from the run's seed (as training builds it)."""
    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.transformer import transformer_config

    cfg = load_config(MOE + overrides)
    init_parallel(cfg)  # also reseeds, so both implementations start from the same draws
    tcfg = transformer_config(cfg)
    tcfg.gradient_accumulation_fusion = False  # (on GPUs it needs the DDP wrapper's main_grad buffers)
    (chunk,) = build_model(cfg, tcfg)
    return chunk


def _named_grads(chunk):
    """Gradients under SequentialMLP's parameter names (stacked expert grads split per expert)."""
    out = {}
    for name, p in chunk.named_parameters():
        if p.dim() == 3:
            owner, proj = name.split("linear_fc")
            out.update({f"{owner}local_experts.{i}.linear_fc{proj}": g for i, g in enumerate(p.grad)})
        else:
            out[name] = p.grad
    return out


def _checkpoint_entries(chunk):
    """(key, global shape, offset, fragmentation, replica id) of each expert checkpoint entry."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    state = chunk.sharded_state_dict()
    apply_factories(state)
    return {(v.key, getattr(v, "global_shape", None), getattr(v, "global_offset", None),
             getattr(v, "axis_fragmentations", None), v.replica_id, getattr(v, "local_shape", None))
            for v in nested_values(state) if ".experts." in v.key}


def _forward_backward(chunk):
    tokens = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(7))
    loss = chunk(tokens, torch.arange(32)[None], None, labels=tokens)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return loss.detach()


def _compare_with_sequential(rank, world_size, layout):
    from megatron_ext.grouped_experts import GroupedExperts, sequential_named_parameters

    seq, grouped = _build(layout + [SEQUENTIAL]), _build(layout + [GROUPED])
    assert any(isinstance(m, GroupedExperts) for m in grouped.modules())
    ref_params, params = dict(seq.named_parameters()), dict(sequential_named_parameters(grouped))
    same_init = ref_params.keys() == params.keys() and all(torch.equal(ref_params[k], params[k]) for k in params)
    ref_loss, loss = _forward_backward(seq), _forward_backward(grouped)
    ref_grads, grads = _named_grads(seq), _named_grads(grouped)
    grad_diff = max((grads[k] - g).abs().max().item() for k, g in ref_grads.items())
    return (same_init, (loss - ref_loss).abs().max().item(), grad_diff, ref_grads.keys() == grads.keys(),
            _checkpoint_entries(seq) == _checkpoint_entries(grouped))


LAYOUTS = {
    "ep1": (1, []),
    "ep2": (2, ["parallel.ep=2"]),
    "etp2": (2, ["parallel.tp=2", "parallel.sp=true", "parallel.etp=2"]),
    "ep2_etp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ep2_etp2" else n for n in LAYOUTS])
def test_grouped_experts_equal_sequential_mlp(name):
    ranks, layout = LAYOUTS[name]
    for same_init, loss_diff, grad_diff, same_names, same_entries in run_on_ranks(
            _compare_with_sequential, ranks, layout):
        assert same_init, "the same seed must give the same expert weights with either implementation"
        assert same_names and same_entries, "parameter names / checkpoint entries differ from SequentialMLP's"
        assert loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)


def _experts_on_given_tokens(rank, world_size):
    """Both implementations on hand-made token groups: empty experts, no tokens at all, probs on
    input, and the fused SwiGLU kernel that GPUs use (`bias_activation_fusion`)."""
    import copy

    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_ext.build import init_parallel
    from megatron_ext.grouped_experts import GroupedExperts
    from megatron_ext.transformer import transformer_config

    cfg = load_config(MOE)
    init_parallel(cfg)
    tcfg, pgs = transformer_config(cfg), get_default_pg_collection()
    seq = SequentialMLP(4, tcfg, _mlp_submodules(), pg_collection=pgs)
    grouped = GroupedExperts(4, tcfg, pg_collection=pgs)
    with torch.no_grad():
        for i, expert in enumerate(seq.local_experts):
            grouped.linear_fc1.weight[i].copy_(expert.linear_fc1.weight)
            grouped.linear_fc2.weight[i].copy_(expert.linear_fc2.weight)
    diffs = {}
    for case, counts, on_input, fused in (("some empty", [5, 0, 3, 0], False, False),
                                          ("all empty", [0, 0, 0, 0], False, False),
                                          ("probs on input", [2, 1, 0, 4], True, False),
                                          ("fused swiglu", [3, 4, 0, 2], False, True)):
        for module in (seq, grouped):
            module.config = copy.copy(tcfg)
            module.config.moe_apply_probs_on_input = on_input
            module.config.moe_router_topk = 1 if on_input else tcfg.moe_router_topk
            module.zero_grad(set_to_none=False)
        grouped.config.bias_activation_fusion = fused  # (the sequential experts keep the unfused one)
        results = []
        for module in (seq, grouped):
            gen = torch.Generator().manual_seed(3)
            x = torch.randn(sum(counts), tcfg.hidden_size, generator=gen, requires_grad=True)
            probs = torch.rand(sum(counts), generator=gen, requires_grad=True)
            out, bias = module(x, torch.tensor(counts), probs)
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            results.append((out, x.grad, probs.grad, *_stacked_grads(module), bias))
        ref, got = results
        assert got[5] is None and got[0].shape == ref[0].shape
        diffs[case] = max((a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(ref[:5], got[:5]))
        empty = torch.tensor(counts) == 0
        diffs[case + ": empty experts' fc1 grads"] = got[3][empty].abs().max().item() if empty.any() else 0.0
    return diffs


def _stacked_grads(module):
    """(fc1, fc2) weight gradients as [experts, out, in], for either implementation."""
    if hasattr(module, "local_experts"):  # SequentialMLP
        return tuple(torch.stack([getattr(e, n).weight.grad for e in module.local_experts])
                     for n in ("linear_fc1", "linear_fc2"))
    return module.linear_fc1.weight.grad, module.linear_fc2.weight.grad


def _mlp_submodules():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def test_zero_token_experts_and_probs_on_input():
    (diffs,) = run_on_ranks(_experts_on_given_tokens, 1)
    assert all(d < 1e-5 for d in diffs.values()), diffs


def _matmuls_per_step(rank, world_size, experts):
    """aten matmul calls (any kind) in one forward + backward of the 2-layer debug model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
             aten.matmul.default, aten.linear.default, aten._grouped_mm.default}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in kinds:
                self.calls[func.__name__] = self.calls.get(func.__name__, 0) + 1
            return func(*args, **(kwargs or {}))

    out = {}
    for impl in (SEQUENTIAL, GROUPED):
        chunk = _build([f"model.num_experts={experts}", impl])
        with Count() as count:
            _forward_backward(chunk)
        out[impl] = count.calls
    return out


def test_matmuls_per_moe_layer_do_not_grow_with_experts():
    small, large = (run_on_ranks(_matmuls_per_step, 1, n)[0] for n in (4, 16))
    assert small[GROUPED] == large[GROUPED], (small, large)
    # Two MoE layers, each 2 grouped GEMMs forward and 4 backward.
    assert small[GROUPED].get("_grouped_mm.default") == 12, small
    # Megatron's SequentialMLP: 6 matmuls per expert and layer.
    assert sum(large[SEQUENTIAL].values()) - sum(small[SEQUENTIAL].values()) == 2 * 6 * (16 - 4), (small, large)


def _save(rank, world_size, overrides, path):
    from megatron_ext import checkpoint

    from megatron_ext.grouped_experts import sequential_named_parameters
    from megatron_ext.placement import global_name

    chunk = _build(overrides)
    checkpoint.save_converted_weights([chunk], path)
    cfg = load_config(MOE + overrides)
    return {global_name(chunk, n, cfg.model): p.detach().clone() for n, p in sequential_named_parameters(chunk)}


def _load(rank, world_size, overrides, path):
    from megatron_ext import checkpoint

    from megatron_ext.grouped_experts import sequential_named_parameters
    from megatron_ext.placement import global_name

    chunk = _build(overrides + ["train.seed=99"])  # other random weights than the saved ones
    cfg = load_config(MOE + overrides)
    checkpoint.load_weights([chunk], checkpoint.Source(path, cfg.model, torch.float32))
    return {global_name(chunk, n, cfg.model): p.detach().clone() for n, p in sequential_named_parameters(chunk)}


@pytest.mark.parametrize("save_layout,load_layout", [
    ((2, ["parallel.tp=2", "parallel.sp=true", "parallel.etp=2", GROUPED]), (1, [SEQUENTIAL])),
    pytest.param((1, [SEQUENTIAL]), (2, ["parallel.ep=2", GROUPED]), marks=pytest.mark.slow),
], ids=["grouped_etp2_to_sequential", "sequential_to_grouped_ep2"])
def test_checkpoint_round_trip_across_implementations(tmp_path, save_layout, load_layout):
    (tmp_path / "ckpt").mkdir()
    saved_by_rank = run_on_ranks(_save, save_layout[0], save_layout[1], tmp_path / "ckpt")
    loaded_by_rank = run_on_ranks(_load, load_layout[0], load_layout[1], tmp_path / "ckpt")
    # Reassemble full tensors from the saving ranks' (expert-)TP shards, then compare with
    # each loading rank's pieces cut the same way.
    full = {}
    for saved in saved_by_rank:
        for name, t in saved.items():
            full.setdefault(name, []).append(t)
    assert {n for loaded in loaded_by_rank for n in loaded} == set(full)
    for loaded in loaded_by_rank:
        for name, t in loaded.items():
            shards = full[name]
            assert any(torch.equal(t, s) for s in shards) or _joined_equal(name, shards, t), name


def _joined_equal(name, shards, whole):
    """The saving ranks' TP shards of `name` put together equal `whole` (SwiGLU: gate and up halves)."""
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(torch.chunk(s, 2) for s in shards))
        return torch.equal(torch.cat(gates + ups), whole)
    dim = 1 if name.endswith(("linear_fc2.weight", "linear_proj.weight")) else 0
    return torch.equal(torch.cat(shards, dim), whole)


def _train(rank, world_size, overrides):
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    cfg = load_config(MOE + ["train.global_batch_size=2", "train.warmup_steps=1"] + overrides)
    validate(cfg, world_size)
    return train(cfg, PretrainStage()).history


@pytest.mark.parametrize("first,then", [
    (SEQUENTIAL, GROUPED),
    pytest.param(GROUPED, SEQUENTIAL, marks=pytest.mark.slow),
], ids=["seq_then_grouped", "grouped_then_seq"])
def test_resume_with_optimizer_state_across_implementations(tmp_path, first, then):
    """A training checkpoint (weights + Adam state) written by one implementation resumes with
    the other exactly as the uninterrupted run goes on."""
    common = ["train.steps=3", "checkpoint.save_interval=2"]
    (ref,) = run_on_ranks(_train, 1, common + [first, f"checkpoint.dir={tmp_path / 'a'}"])
    (resumed,) = run_on_ranks(_train, 1, common + [then, f"checkpoint.dir={tmp_path / 'b'}",
                                                   f"checkpoint.load={tmp_path / 'a'}/iter_0000002"])
    assert len(resumed) == 1
    assert math.isclose(resumed[-1]["loss"], ref[-1]["loss"], rel_tol=1e-6), (ref[-1], resumed[-1])
    assert math.isclose(resumed[-1]["grad_norm"], ref[-1]["grad_norm"], rel_tol=1e-5), (ref[-1], resumed[-1])


def test_grouped_gemm_default_and_errors():
    cfg = load_config(MOE)
    assert cfg.moe.grouped_gemm is None and grouped_gemm_enabled(cfg)  # fp32 on CPU: supported
    assert not grouped_gemm_enabled(load_config(["model=qwen3_debug"]))  # a dense model
    odd = ["model.moe_ffn_hidden_size=30"]  # 30 fp32 values: rows of 120 bytes
    assert not grouped_gemm_enabled(load_config(MOE + odd))  # null falls back to SequentialMLP
    validate(load_config(MOE + odd), 1)
    with pytest.raises(ConfigError, match=r"moe.grouped_gemm=true, but .*multiple of 16 bytes"):
        validate(load_config(MOE + odd + [GROUPED]), 1)
    validate(load_config(MOE + odd + [GROUPED]), 1, check_device=False)  # planning elsewhere


def test_unsupported_reasons():
    from megatron_ext.grouped_experts import unsupported_reason

    assert unsupported_reason(torch.float32, "cpu", (64, 16)) is None
    assert "multiple of 16 bytes" in unsupported_reason(torch.bfloat16, "cpu", (64, 12))
    if torch.cuda.is_available():
        assert "bfloat16 only on CUDA" in unsupported_reason(torch.float32, "cuda", (64, 16))
