"""The Megatron-Core patches (megatron_ext/patches.py) still match the upstream code they patch and do what they say."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    from tests.forked_ranks import run_on_ranks

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
    from tests.forked_ranks import run_on_ranks

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


def test_foreach_optimizer_ops_compute_what_megatrons_loops_do():
    """The multi-tensor stand-ins against Megatron-Core's own Python-loop fallbacks' arithmetic:
    the global gradient norm, clipping in place, and fp32 main weights copied (or scaled) into
    bf16 model weights, over tensors of several shapes."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) for shape in [(7, 5), (3,), (64, 33), (1,)]]
    total, per_tensor = patches._foreach_l2_norm(2048, None, [grads], True)
    expected = torch.norm(torch.tensor([torch.norm(t) for t in grads]))  # megatron.core.utils' loop
    assert total.shape == (1,) and total.dtype == torch.float32
    torch.testing.assert_close(total[0], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_tensor, torch.stack([t.norm() for t in grads]))

    clipped = [t.clone() for t in grads]
    patches._foreach_scale(2048, None, [clipped, clipped], 0.25)
    for before, after in zip(grads, clipped):
        torch.testing.assert_close(after, before * 0.25, rtol=0, atol=0)

    model = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in grads] + [torch.zeros(2)]
    main = grads + [torch.tensor([1.5, -2.0])]
    patches._copy_this_to_that(main, model)
    for src, dst in zip(main, model):
        assert dst.dtype in (torch.bfloat16, torch.float32)
        assert torch.equal(dst, src.to(dst.dtype))
    patches._foreach_scale(2048, None, [main, model], 2.0)
    for src, dst in zip(main, model):
        assert torch.equal(dst, (src * 2.0).to(dst.dtype))


class _Ops(TorchDispatchMode):
    """Counts the operators dispatched inside it by name (views and detach aside: no kernels)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.detach.default:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _optimizer_step_ops(rank, world_size, layer_counts, overrides):
    """For each layer count: the operators (views aside) and host syncs of a Megatron optimizer
    step (the second: the first creates Adam's state), whether torch's Adam runs fused, and the step's grad norm
    against the norm of the gradients computed directly."""
    from megatron_ext.build import build
    from megatron_ext.cli import load_config

    results = []
    for layers in layer_counts:
        rt = build(load_config(["model=qwen2_debug", f"model.num_layers={layers}", "model.vocab_size=512",
                                "train.clip_grad=0.5"] + overrides))
        g = torch.Generator().manual_seed(layers)
        params = [p for chunk in rt.model for p in chunk.parameters()]
        for step in range(2):  # the first step also creates Adam's state
            for p in params:
                p.main_grad.copy_(torch.randn(p.main_grad.shape, generator=g))
            if step == 0:
                rt.optimizer.step()
        expected_norm = torch.linalg.vector_norm(torch.stack([p.main_grad.norm() for p in params])).item()
        with _Ops() as ops:
            _, grad_norm, _ = rt.optimizer.step()
        fused = [group["fused"] for opt in rt.optimizer.chained_optimizers for group in opt.optimizer.param_groups]
        results.append((len(params), dict(ops.counts), fused, grad_norm, expected_norm))
    return results


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_optimizer_step_issues_the_same_kernels_for_any_number_of_parameters(precision):
    """Without Apex or Transformer Engine an optimizer step (norm, clip, Adam, main -> model
    weights) is a fixed handful of multi-tensor kernels and one host sync, not a loop of kernels
    per parameter (Megatron-Core's fallbacks and torch's unfused Adam issue several per
    parameter, and on GPUs a device-to-host copy per parameter for the norm)."""
    from tests.forked_ranks import run_on_ranks

    ((small, large),) = run_on_ranks(_optimizer_step_ops, 1, [2, 6], [f"precision={precision}"])
    assert large[0] == small[0] + 4 * 7  # parameters: 7 per layer
    assert small[1] == large[1], (small[1], large[1])
    assert large[1].get("_local_scalar_dense.default") == 1, large[1]  # Megatron's .item() of the norm
    assert sum(large[1].values()) < 40, large[1]
    for _, _, fused, grad_norm, expected_norm in (small, large):
        assert fused and all(fused)
        assert grad_norm == pytest.approx(expected_norm, rel=1e-5)


def _autograd_node_names(rank, world_size, tp):
    """Names of the autograd nodes behind a forward pass of a tiny model at tensor-parallel size tp."""
    from megatron_ext.build import build
    from megatron_ext.cli import load_config

    rt = build(load_config(["model=qwen2_debug", "model.num_layers=2", "model.vocab_size=512", f"parallel.tp={tp}"]))
    tokens = torch.randint(0, 512, (1, 16))
    logits = rt.model[0](tokens, torch.arange(16)[None], attention_mask=None)
    names, seen, todo = set(), set(), [logits.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_one_rank_tensor_parallel_mappings_add_no_autograd_nodes():
    """At TP=1 the layers' copy / all-reduce mappings are the tensor itself (no autograd node per
    linear layer); at TP=2 the all-reduce is Megatron's own function."""
    from tests.forked_ranks import run_on_ranks

    mappings = {"_CopyToModelParallelRegionBackward", "_ReduceFromModelParallelRegionBackward"}
    (one,) = run_on_ranks(_autograd_node_names, 1, 1)
    two = run_on_ranks(_autograd_node_names, 2, 2)
    megatron_linear, lean_linear = "LinearWithGradAccumulationAndAsyncCommunicationBackward", "_LinearWithoutCommunicationBackward"
    assert lean_linear in one and megatron_linear not in one, one
    assert not one & mappings, one
    # (at TP>1 the column-parallel layers all-reduce their input gradient themselves: Megatron's
    # function; the row-parallel ones communicate nothing in their linear function)
    assert all("_ReduceFromModelParallelRegionBackward" in names for names in two), two
    assert all(megatron_linear in names and lean_linear in names for names in two), two


def _linear_layers_against_megatron(rank, world_size):
    """Megatron's column- and row-parallel layers through the patched linear function and through
    Megatron's own (`__wrapped__`), from the same weights and inputs over two micro-batches: with
    and without gradient accumulation fusion (into an fp32 main_grad, with the DDP hook's flag),
    fp32 and bf16, with and without bias. Everything each path produces, compared exactly."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.transformer import transformer_config

    cfg = load_config([])
    init_parallel(cfg)  # applies the patches
    patches._WgradAccumulation.mixed_dtype_gemm = False  # CPU has no addmm(out_dtype)
    patched = layers.linear_with_grad_accumulation_and_async_allreduce
    original = patched.__wrapped__
    results = {}
    for fusion in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for kind, bias in ((ColumnParallelLinear, True), (ColumnParallelLinear, False), (RowParallelLinear, False)):
                tcfg = transformer_config(cfg)
                tcfg.gradient_accumulation_fusion, tcfg.params_dtype = fusion, dtype
                extra = {"gather_output": True} if kind is ColumnParallelLinear else {"input_is_parallel": True,
                                                                                       "skip_bias_add": False}
                torch.manual_seed(0)
                layer = kind(8, 6, config=tcfg, init_method=torch.nn.init.normal_, bias=bias, **extra)
                gen = torch.Generator().manual_seed(1)
                inputs = [torch.randn(5, 2, 8, generator=gen).to(dtype) for _ in range(2)]
                runs = []
                for fn in (patched, original):
                    layers.linear_with_grad_accumulation_and_async_allreduce = fn
                    for p in layer.parameters():
                        p.grad = None
                    if fusion:
                        layer.weight.main_grad = torch.zeros(layer.weight.shape)
                        layer.weight.grad_added_to_main_grad = False
                    outs, input_grads = [], []
                    for x in inputs:
                        x = x.clone().requires_grad_()
                        out = layer(x)[0]
                        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
                        outs.append(out.detach())
                        input_grads.append(x.grad)
                    runs.append({"out": outs, "input_grad": input_grads,
                                 "main_grad": getattr(layer.weight, "main_grad", None),
                                 "flag": getattr(layer.weight, "grad_added_to_main_grad", None),
                                 "weight_grad": None if fusion else layer.weight.grad,
                                 "dummy_grad_shape": tuple(layer.weight.grad.shape) if fusion else None,
                                 "bias_grad": layer.bias.grad if bias else None})
                layers.linear_with_grad_accumulation_and_async_allreduce = patched
                results[f"{kind.__name__} bias={bias} fusion={fusion} {dtype}"] = runs
    return results


def test_linear_without_communication_matches_megatrons_function():
    from tests.forked_ranks import run_on_ranks

    (results,) = run_on_ranks(_linear_layers_against_megatron, 1)
    assert len(results) == 12
    for case, (ours, megatron) in results.items():
        assert ours.keys() == megatron.keys()
        for key in ours:
            a, b = ours[key], megatron[key]
            if isinstance(a, list):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (case, key)
            elif isinstance(a, torch.Tensor):
                assert torch.equal(a, b), (case, key)
            else:
                assert a == b, (case, key)
        if "fusion=True" in case:
            assert ours["flag"] is True and ours["main_grad"].abs().sum() > 0, case


def _forward_backward_syncs_and_grads(rank, world_size):
    """One global batch's forward_backward_func (2 micro-batches, per-token loss) with the patched
    finalize_model_grads and with Megatron's: host syncs dispatched and the gradients, for a batch
    with tokens and for one whose loss mask is all zero."""
    import importlib

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.build import build
    from megatron_ext.cli import load_config
    from megatron_ext.pretrain import PretrainStage

    rt = build(load_config(["model=qwen2_debug", "model.num_layers=2", "model.vocab_size=512", "data.seq_length=16",
                            "train.micro_batch_size=1", "train.global_batch_size=2"]))
    module = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    patched = rt.transformer_config.finalize_model_grads_func
    assert patched is module.finalize_model_grads and hasattr(patched, "__wrapped__")
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    results = {}
    for masked in (1.0, 0.0):
        batches = [{"tokens": t[None, :-1], "labels": t[None, 1:], "position_ids": torch.arange(16)[None],
                    "loss_mask": torch.full((1, 16), masked)} for t in tokens]
        for name, finalize in (("patched", patched), ("megatron", patched.__wrapped__)):
            rt.transformer_config.finalize_model_grads_func = finalize
            for chunk in rt.model:
                chunk.zero_grad_buffer()
            with _Ops() as ops:
                get_forward_backward_func()(forward_step_func=PretrainStage().forward_step, data_iterator=iter(batches),
                                            model=rt.model, num_microbatches=2, seq_length=16, micro_batch_size=1,
                                            forward_only=False)
            grads = [p.main_grad.clone() for p in rt.model[0].parameters()]
            results[(name, masked)] = (ops.counts.get("_local_scalar_dense.default", 0), grads)
    rt.transformer_config.finalize_model_grads_func = patched
    return results


def test_token_scaling_without_sync_leaves_forward_backward_free_of_host_syncs():
    """Megatron's per-token gradient scaling reads the token count on the host (one sync per step,
    and no CUDA graph can capture it); the patched one scales on the device to the same gradients,
    also when the batch has no loss tokens (Megatron then leaves them unscaled)."""
    from tests.forked_ranks import run_on_ranks

    (results,) = run_on_ranks(_forward_backward_syncs_and_grads, 1)
    for masked in (1.0, 0.0):
        (ours_syncs, ours), (megatron_syncs, megatron) = results[("patched", masked)], results[("megatron", masked)]
        assert (ours_syncs, megatron_syncs) == (0, 1), masked
        assert all(torch.equal(a, b) for a, b in zip(ours, megatron)), masked
    assert any(g.abs().sum() > 0 for g in results[("patched", 1.0)][1])


def test_rope_tables_keep_what_a_cuda_graph_capture_read(monkeypatch):
    """A captured graph replays reads of the cos/sin tables' memory: the tables it read stay
    referenced after the cache moves on to other frequencies (another length, in evaluation or
    generation), so their memory is never handed to other tensors."""
    tables = patches._RopeTables()
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    gen = torch.Generator().manual_seed(0)
    first, other = torch.rand(8, 1, 1, 4, generator=gen), torch.rand(6, 1, 1, 4, generator=gen)

    def get(freqs):
        return tables.get((freqs,), (), lambda: freqs, torch.float32, 1.0)

    warm = get(first)  # eager warm-up steps
    assert tables.captured == []
    capturing[0] = True
    captured = get(first)  # the capture: a cache hit, read by the graph
    get(first)  # the next layer
    capturing[0] = False
    later = get(other)
    assert captured[0] is warm[0] and tables.cos is later[0] is not warm[0]
    assert len(tables.captured) == 1 and all(a is b for a, b in zip(tables.captured[0], captured))


class _Group:
    """A stand-in context-parallel group: RoPE asks it for its size and rank only."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def _rope_against_megatron(rank, world_size):
    """Megatron's RoPE functions as patched against the originals (`__wrapped__`) on the same
    inputs, forward and backward; and the operators a repeated call (the next layer, or keys after
    queries) dispatches: no cos / sin, no host sync."""
    from megatron.core.models.common.embeddings import rope_utils

    patches.apply()

    def run(fn, t, *args, **kwargs):
        t = t.clone().requires_grad_()
        out = fn(t, *args, **kwargs)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
        return out.detach(), t.grad

    g = torch.Generator().manual_seed(0)
    results, repeat_ops = {}, {}
    freqs = torch.rand(32, 1, 1, 8, generator=g) * 20
    for dtype in (torch.float32, torch.bfloat16):
        for heads in (4, 2):  # queries, then keys with the same frequencies
            t = torch.randn(32, 2, heads, 8, generator=g).to(dtype)
            patched = rope_utils._apply_rotary_pos_emb_bshd
            results[f"bshd {dtype} {heads}"] = (run(patched, t, freqs), run(patched.__wrapped__, t, freqs))
        with _Ops() as ops:
            run(patched, t, freqs)
        repeat_ops[f"bshd {dtype}"] = ops.counts
    cu_seqlens = torch.tensor([0, 8, 12, 24, 32], dtype=torch.int32)
    on_device = cu_seqlens.to("meta")  # boundaries on a device that cannot be read, with their host copy
    on_device.host_copy = cu_seqlens
    for cp_size in (1, 2):
        for cp_rank in range(cp_size):
            for name, table in (("max-length", torch.rand(32, 1, 1, 8, generator=g) * 20),
                                ("every-position", freqs)):  # (freqs.size(0) == cu_seqlens[-1])
                if name == "max-length":
                    table = table[:16]
                t = torch.randn(32 // cp_size, 4, 8, generator=g)
                group = _Group(cp_size, cp_rank)
                patched = rope_utils._apply_rotary_pos_emb_thd
                results[f"thd cp{cp_size}.{cp_rank} {name}"] = (
                    run(patched, t, cu_seqlens, table, cp_group=group),
                    run(patched.__wrapped__, t, cu_seqlens, table, cp_group=group))
                with _Ops() as ops:
                    run(patched, t, cu_seqlens, table, cp_group=group)
                repeat_ops[f"thd cp{cp_size}.{cp_rank} {name}"] = ops.counts
                results[f"thd cp{cp_size}.{cp_rank} {name} device boundaries"] = (
                    run(patched, t, on_device, table, cp_group=group), results[f"thd cp{cp_size}.{cp_rank} {name}"][1])
    same = {k: all(torch.equal(a, b) for a, b in zip(ours, megatron)) for k, (ours, megatron) in results.items()}
    return same, repeat_ops


def test_rope_tables_equal_megatrons_rope_and_are_computed_once():
    """Sequences and packed documents (CP 1 and 2, both of Megatron's frequency layouts), fp32 and
    bf16: bit-identical outputs and gradients on CPU, also with the packed boundaries on a device
    and read from their host copy; a repeated call with the same frequencies (and cu_seqlens)
    computes no cos / sin and, for packed documents, makes no host sync."""
    from tests.forked_ranks import run_on_ranks

    ((same, repeat_ops),) = run_on_ranks(_rope_against_megatron, 1)
    assert len(same) == 4 + 6 + 6 and all(same.values()), same
    for name, counts in repeat_ops.items():
        assert not {"cos.default", "sin.default", "_local_scalar_dense.default"} & set(counts), (name, counts)
