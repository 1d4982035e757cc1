"""FP8 through torchao (megatron_ext.fp8), checked on CPU with torchao's emulated FP8 GEMMs.

- The FP8 linear function equals torchao's own float8 matmul under its `tensorwise` and `rowwise`
  recipes (the reference: same casts, same scales, same GEMMs), bit for bit.
- The weight's FP8 cast is made once per optimizer step and redone when the weight changes.
- The debug model trained 20 steps with FP8 GEMMs tracks the fp32 run (LOSS_TOL).
- TP=2 with sequence parallelism, PP=2 and DP=2 with the distributed optimizer train like one
  process under FP8 (the TP ranks scale by the amax over the whole tensor, so they quantize as
  one process does; the weight casts are redone after every optimizer's step).
- A checkpoint saved under FP8 resumes bit-identically and loads into fp32 and bf16 models.
- Config errors name the recipe/backend combinations that cannot run.
"""

import dataclasses
import functools

import pytest
import torch

from tests.forked_ranks import run_on_ranks
from tests.test_checkpoint import _assert_same_run, _run

FP8 = ["precision=fp8_current", "precision.fp8_emulate=true"]
SHORT = ["model=qwen3_debug", "train.steps=3", "train.warmup_steps=1", "train.global_batch_size=4",
         "train.micro_batch_size=1", "data.seq_length=32", "checkpoint.keep_last=0"]
LONG = ["model=qwen3_debug", "train.steps=20", "train.warmup_steps=2", "train.global_batch_size=4",
        "train.micro_batch_size=2", "data.seq_length=64"]
LOSS_TOL = 0.02
"""Relative gap allowed between the FP8 and the fp32 loss at each of the 20 steps (measured: at
most 0.7% for fp8_current, 0.5% for fp8_rowwise; E4M3 rounds each GEMM operand by up to 6%)."""
FIRST_STEP_TOL = 1e-5
"""Relative gap of the first step's loss and grad norm between a parallel layout and one
process under FP8: same weights, same quantization, fp32 sums in another order (measured:
2e-6 for TP=2+SP and PP=2; TP ranks scaling by their own shard's amax instead: 1.6e-3)."""
LAYOUT_TOL = 1e-3
"""... and of the later steps' losses: an operand at a rounding boundary of E4M3 may round the
other way once the weights carry fp32 noise, and Adam's first steps amplify it (measured: at
most 1.2e-4)."""


def _torchao_reference(recipe: str, x, w, g):
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    from megatron_ext.fp8 import _mm_config

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    out = matmul_with_hp_or_float8_args.apply(x, w.t(), _mm_config(True), config)
    out.backward(g)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,recipe", [("fp8_current", "tensorwise"), ("fp8_rowwise", "rowwise")])
def test_fp8_linear_equals_torchaos_recipe(name, recipe, dtype):
    from megatron_ext import fp8

    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*s, generator=gen, dtype=dtype) for s in ((64, 48), (32, 48), (64, 32)))
    ref = _torchao_reference(recipe, x.clone().requires_grad_(), w.clone().requires_grad_(), g)
    x.requires_grad_(), w.requires_grad_()
    fp8.CASTS.new_step()
    assert fp8.convert_weight(w, fp8.make_recipe(name, None, emulate=True))
    out = fp8.linear(x, w, None, False, False, False)
    out.backward(g)
    for got, want in zip((out.detach(), x.grad, w.grad), ref):
        assert got.dtype == dtype and torch.equal(got, want)
    exact = (x @ w.t()).detach()
    error = ((out - exact).float().norm() / exact.float().norm()).item()
    assert 0.01 < error < 0.1, error  # quantized to FP8, not computed in the input dtype


def test_weight_cast_once_per_step(monkeypatch):
    from megatron_ext import fp8

    casts = []
    cast = fp8._to_float8
    monkeypatch.setattr(fp8, "_to_float8", lambda t, *a: casts.append(t.shape) or cast(t, *a))
    w = torch.randn(16, 32, requires_grad=True)
    fp8.convert_weight(w, fp8.make_recipe("fp8_current", None, emulate=True))
    fp8.CASTS.new_step()

    def weight_casts(micro_batches: int):
        casts.clear()
        for _ in range(micro_batches):
            x = torch.randn(8, 32, requires_grad=True)
            fp8.linear(x, w, None, False, False, False).sum().backward()
        return sum(1 for shape in casts if shape == w.shape)

    assert weight_casts(3) == 1  # micro-batches and their backward passes reuse it
    fp8.CASTS.new_step()  # the optimizer stepped
    assert weight_casts(1) == 1
    with torch.no_grad():
        w.mul_(2.0)  # any in-place change of the weight also counts
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(fp8.linear(x, w, None, False, False, False),
                           fp8._Float8Linear.apply(x, w.detach().clone().requires_grad_(), fp8._Layer(
                               w.fp8_recipe, False, None, 1)))


@pytest.mark.slow  # about 45 s of compilation on 2 CPU cores
def test_compiled_cast_equals_the_eager_cast():
    """The cast GPUs run compiled (one kernel each for amax and quantization) gives the eager
    cast's bits and scales, for both granularities (compiled here on CPU)."""
    import torch._dynamo

    from megatron_ext import fp8

    x = torch.randn(64, 48, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(disable=False):
        for axis, power_of_2 in ((None, False), (-1, True)):  # bound as fp8._on_device binds them
            amax = torch.compile(functools.partial(fp8._amax, axis=axis))(x)
            bits, scale = torch.compile(functools.partial(fp8._quantize, dtype=torch.float8_e4m3fn,
                                                          power_of_2=power_of_2))(x, amax)
            eager_bits, eager_scale = fp8._quantize(x, fp8._amax(x, axis), torch.float8_e4m3fn, power_of_2)
            assert torch.equal(amax, fp8._amax(x, axis)) and torch.equal(scale, eager_scale)
            assert torch.equal(bits.view(torch.uint8), eager_bits.view(torch.uint8))


def test_megatrons_linear_function_runs_marked_weights_in_fp8():
    """The patched module global both parallel layers call: a weight marked by fp8.convert takes
    the FP8 path, any other weight Megatron's (here its lean no-communication form: exact)."""
    from megatron.core.tensor_parallel import layers

    from megatron_ext import fp8, patches

    patches.apply()
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 8, 48, generator=gen), torch.randn(32, 48, generator=gen, requires_grad=True)
    call = layers.linear_with_grad_accumulation_and_async_allreduce
    assert torch.equal(call(x, w, None, False, False, False), torch.matmul(x, w.t()))
    fp8.convert_weight(w, fp8.make_recipe("fp8_current", None, emulate=True))
    fp8.CASTS.new_step()
    got = call(x, w, None, False, False, False)
    assert torch.equal(got, fp8.linear(x, w, None, False, False, False)) and not torch.equal(got, x @ w.t())


def _losses(hist):
    return [h["loss"] for h in hist]


@pytest.fixture(scope="module")
def fp32_20_steps():
    return _losses(run_on_ranks(_run, 1, LONG)[0][0])


@pytest.mark.parametrize("precision", ["fp8_current", pytest.param("fp8_rowwise", marks=pytest.mark.slow)])
def test_fp8_training_tracks_fp32(fp32_20_steps, precision):
    losses = _losses(run_on_ranks(_run, 1, LONG + [f"precision={precision}", "precision.fp8_emulate=true"])[0][0])
    gaps = [abs(a - b) / b for a, b in zip(losses, fp32_20_steps)]
    assert max(gaps) < LOSS_TOL, gaps
    assert max(gaps) > 1e-3, gaps  # the GEMMs ran in FP8
    assert losses[-1] < losses[0] - 1.5


@pytest.fixture(scope="module")
def fp8_one_process():
    return run_on_ranks(_run, 1, SHORT + FP8)[0]


# The distributed optimizer updates the weights through its own buffers: the FP8 casts must be
# redone after its step as after the plain optimizer's.
@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sp=true"], ["parallel.pp=2"],
                                    ["parallel.distributed_optimizer=true"]], ids=["tp2_sp", "pp2", "dp2_distopt"])
def test_fp8_parallel_layouts_equal_one_process(fp8_one_process, layout):
    ranks = run_on_ranks(_run, 2, SHORT + FP8 + layout)
    ref = fp8_one_process[0]
    for hist, _, _ in ranks:
        assert (hist[0]["loss"], hist[0]["grad_norm"]) == pytest.approx((ref[0]["loss"], ref[0]["grad_norm"]),
                                                                        rel=FIRST_STEP_TOL)
        assert _losses(hist) == pytest.approx(_losses(ref), rel=LAYOUT_TOL)


def _params_after_loads(rank, world_size, overrides, precisions):
    """The full parameters of a model built at each precision and loaded from the checkpoint."""
    from megatron_ext import checkpoint
    from megatron_ext.build import build
    from megatron_ext.cli import load_config
    from tests.test_train import full_params

    out = {}
    for precision in precisions:
        rt = build(load_config(overrides + [f"precision={precision}"]))
        checkpoint.resume(rt)
        out[precision] = full_params(rt.model)
    return out


def test_fp8_checkpoint_resumes_bit_identically_and_loads_in_fp32_and_bf16(tmp_path, fp8_one_process):
    ckpt = [f"checkpoint.dir={tmp_path}"]
    first = run_on_ranks(_run, 1, SHORT + FP8 + ckpt + ["train.exit_interval=2"])[0]
    assert first[1] == 2
    resumed = run_on_ranks(_run, 1, SHORT + FP8 + ckpt + ["checkpoint.load=auto"])[0]
    ref_hist, ref_step, ref_params = fp8_one_process
    _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed)
    load = SHORT + [f"checkpoint.load={tmp_path}/iter_0000002", "checkpoint.weights_only=true"]
    saved = first[2]
    loads = run_on_ranks(_params_after_loads, 1, load, ["fp32", "bf16"])[0]
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        loaded = loads[precision]
        assert loaded.keys() == saved.keys()
        for name, p in saved.items():
            assert loaded[name].dtype == dtype and torch.equal(loaded[name], p.to(dtype)), (precision, name)


def _errors(overrides, check_device=True):
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError, validate

    try:
        validate(load_config(overrides), 1, check_device=check_device)
    except ConfigError as e:
        return str(e)
    return ""


def test_config_names_what_cannot_run():
    assert "fp8_delayed needs Transformer Engine" in _errors(["precision=fp8_delayed", "precision.fp8_backend=torchao"],
                                                            check_device=False)
    assert "fp8_rowwise runs through torchao only" in _errors(["precision=fp8_rowwise", "precision.fp8_backend=te"],
                                                              check_device=False)
    assert "precision.fp8_emulate=true emulates torchao's FP8 recipes" in _errors(
        ["precision=fp8_blockwise", "precision.fp8_emulate=true"], check_device=False)
    assert "precision.fp8_backend='cuda' is not" in _errors(["precision=fp8_current", "precision.fp8_backend=cuda"],
                                                            check_device=False)
    assert _errors(["precision=fp8_rowwise"], check_device=False) == ""
    assert _errors(FP8) == "" and _errors(["precision=fp8_rowwise", "precision.fp8_emulate=true"]) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
def test_cpu_refuses_real_fp8_and_points_to_emulation():
    assert "fp8_emulate=true emulates it on CPU" in _errors(["precision=fp8_current", "precision.fp8_backend=torchao"])
    assert "fp8_emulate=true emulates it on CPU" in _errors(["precision=fp8_rowwise"])
    assert "needs a CUDA GPU with Transformer Engine" in _errors(["precision=fp8_delayed"])


def _fp8_layers(rank, world_size, overrides):
    """(name, runs in FP8) for every linear layer of the model the config builds."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.transformer import transformer_config

    cfg = load_config(overrides)
    init_parallel(cfg)
    chunk = build_model(cfg, transformer_config(cfg))[0]
    return [(name, getattr(m.weight, "fp8_recipe", None) is not None) for name, m in chunk.named_modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


@pytest.mark.parametrize("model", ["qwen3_debug", "qwen2_moe_debug"])
def test_the_decoders_linear_layers_run_in_fp8_but_not_the_routed_experts_or_the_head(model):
    layers = dict(run_on_ranks(_fp8_layers, 1, [f"model={model}"] + FP8)[0])
    fp8_layers = {name.split(".")[-1] for name, on in layers.items() if on}
    assert fp8_layers == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    for name, on in layers.items():
        assert on == (name.startswith("decoder.") and ".experts." not in name), name
    if model == "qwen2_moe_debug":
        assert any(on and ".shared_experts." in name for name, on in layers.items())


def test_qwen_gpu_shapes_fit_the_fp8_kernels():
    from megatron_ext import fp8
    from megatron_ext.cli import load_config

    for model in ("qwen2_5_1_5b", "qwen3_30b_a3b"):
        assert fp8.unaligned_weights(load_config([f"model={model}", "precision=fp8_current"])) == [], model
    odd = fp8.unaligned_weights(load_config(["model=qwen3_debug", "model.ffn_hidden_size=104"]))
    assert [u.split()[0] for u in odd] == ["mlp.linear_fc2"], odd  # fc1 (208, h) fits, fc2 (h, 104) does not


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 GEMMs (compute capability >= 8.9)")
@pytest.mark.parametrize("name", ["fp8_current", "fp8_rowwise"])
def test_fp8_gemms_on_the_gpu_equal_the_emulation(name):
    """torch._scaled_mm computes what the emulation computes: same FP8 operands, the products
    summed in another order (fast accumulation in the forward GEMM)."""
    from megatron_ext import fp8

    gen = torch.Generator(device="cuda").manual_seed(0)
    x, w, g = (torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)
               for s in ((512, 1024), (768, 1024), (512, 768)))
    results = []
    for emulate in (True, False):
        fp8.CASTS.new_step()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        fp8.convert_weight(wi, fp8.make_recipe(name, None, emulate=emulate))
        out = fp8.linear(xi, wi, None, False, False, False)
        out.backward(g)
        results.append((out.detach().float(), xi.grad.float(), wi.grad.float()))
    for emulated, real in zip(*results):
        assert ((real - emulated).norm() / emulated.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 GEMMs (compute capability >= 8.9)")
def test_torchao_fp8_loss_tracks_bf16_on_the_gpu():
    from tests import gloo
    from tests.test_gpu import FP8_STEP_BAND, FP8_TAIL_BAND, _losses as gpu_losses

    steps = ["train.steps=30", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=5"]
    (bf16,), (fp8,) = (gloo.run_on_ranks(gpu_losses, 1, steps + p) for p in
                       (["precision=bf16"], ["precision=fp8_current", "precision.fp8_backend=torchao"]))
    assert bf16[-1] < bf16[0] - 1.0, bf16
    for step, (a, b) in enumerate(zip(bf16, fp8), 1):
        assert abs(a - b) <= FP8_STEP_BAND * a, (step, a, b)
    assert abs(sum(fp8[-5:]) - sum(bf16[-5:])) <= FP8_TAIL_BAND * sum(bf16[-5:])
