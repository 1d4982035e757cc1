"""tools.bench_train on CPU: the FLOP formula against hand counts and the built model, a 2-step run with
its JSON, FP8/offload rejected without a GPU, and the precision/recompute wiring."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.cli import load_config
from megatron_ext.config import ConfigError, validate
from tests.forked_ranks import run_on_ranks
from tools import bench_train as bench

REPO = Path(__file__).resolve().parent.parent
DEBUG = ["qwen3_debug", "qwen2_debug", "qwen2_moe_debug", "qwen3_moe_debug"]


def test_flops_hand_count_dense():
    cfg = load_config(["model=qwen3_debug", "data.seq_length=128"])
    # h=64, a=4 heads, g=2 groups, d=32 (decoupled head_dim), f=192, L=4, V=151936.
    qkv, proj, mlp = 64 * (4 + 2 * 2) * 32, 4 * 32 * 64, 3 * 64 * 192  # 16384, 8192, 36864
    assert (qkv, proj, mlp) == (16384, 8192, 36864)
    n_active = 4 * (16384 + 8192 + 36864) + 151936 * 64
    assert n_active == 9_969_664 == bench.active_params(cfg)["total"]
    attention = 12 * 4 * (4 * 32) * 128  # 12 * L * h_attn * s
    assert bench.flops_per_token(cfg) == 6 * 9_969_664 + attention == 60_604_416


def test_flops_hand_count_moe_counts_only_active_experts():
    cfg = load_config(["model=qwen2_moe_debug", "data.seq_length=128"])
    # Layer 0 is MoE (4 experts, top-2, f_e=32, gated shared expert f_s=48), layer 1 dense;
    # h=64, 4 heads of d=16, 2 groups.
    attention = 2 * (64 * 8 * 16 + 4 * 16 * 64)
    moe = 4 * 64 + 2 * 3 * 64 * 32 + (3 * 64 * 48 + 64)
    parts = bench.active_params(cfg)
    assert parts["experts"] == 12288 and parts["router"] == 256 and parts["shared_expert"] == 9280
    assert parts["total"] == attention + moe + 3 * 64 * 192 + 151936 * 64 == 9_807_168
    assert bench.flops_per_token(cfg) == 6 * 9_807_168 + 12 * 2 * 64 * 128 == 59_039_616


def _built_active_params(rank, world_size, models):
    """Matmul weights per token counted from Megatron's built modules (experts scaled by k/E)."""
    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.transformer import transformer_config

    out = {}
    for name in models:
        cfg = load_config([f"model={name}"])
        init_parallel(cfg)
        (chunk,) = build_model(cfg, transformer_config(cfg))
        m, total = cfg.model, 0.0
        for pname, p in chunk.named_parameters():
            if p.dim() < 2 or pname == "embedding.word_embeddings.weight":
                continue  # norms and biases are 1-D; the embedding is a lookup
            # Routed experts, one matrix each or stacked [experts, out, in] for grouped GEMMs.
            total += p.numel() * (m.moe_router_topk / m.num_experts if ".experts." in pname else 1)
        if m.tie_word_embeddings:
            total += m.vocab_size * m.hidden_size  # the output GEMM reuses the embedding
        out[name] = (total, sum(p.numel() for p in chunk.parameters()))
    return out


def test_active_params_match_built_model_and_estimator():
    from tools.estimate_memory import estimate

    (built,) = run_on_ranks(_built_active_params, 1, DEBUG)
    for name in DEBUG:
        cfg = load_config([f"model={name}"])
        assert bench.active_params(cfg)["total"] == built[name][0], name
        assert estimate(cfg, 1)["stages"][0]["params"] == built[name][1], name


def test_cut_layers_keeps_moe_pattern():
    cfg = load_config(["model=qwen2_moe_debug"])
    bench.cut_layers(cfg, 1)
    assert cfg.model.num_layers == 1 and cfg.model.moe_layer_freq == [1]
    validate(cfg, 1)
    big = load_config(["model=qwen3_30b_a3b"])
    bench.cut_layers(big, 2)
    validate(big, 1)
    assert big.model.num_layers == 2 and bench.active_params(big)["experts"] == 2 * 8 * 3 * 2048 * 768
    with pytest.raises(ConfigError, match="--layers=5"):
        bench.cut_layers(load_config([]), 5)


def test_peak_table():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "fp8_current") == 1979.0
    assert bench.peak_tflops("NVIDIA H200", "fp8_delayed") == 1979.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bf16") is None
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None


def test_synthetic_data_repeats_first_half():
    ds = bench.SyntheticDataset(4, 64, 151936, seed=1)
    a, b = ds[3], ds[3]
    assert (a["tokens"] == b["tokens"]).all() and not (ds[2]["tokens"] == a["tokens"]).all()
    ids = list(a["tokens"]) + [a["labels"][-1]]
    assert ids[:32] == ids[33:65] and (a["labels"][:-1] == a["tokens"][1:]).all()
    assert int(a["tokens"].max()) < bench.SYNTHETIC_VOCAB


def test_bench_cpu_two_steps_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench_train", "model=qwen3_debug", "data.seq_length=64",
         "train.global_batch_size=4", "--steps", "2", "--warmup", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6*N_active + 12*L*h_attn*s" in proc.stdout and "no peak known for cpu" in proc.stdout
    r = json.loads(out.read_text())
    assert (r["device"], r["spec"], r["world_size"], r["timed_steps"]) == ("cpu", "local", 1, 2)
    assert r["mfu"] is None and r["peak_tflops"] is None
    assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    cfg = load_config(["model=qwen3_debug", "data.seq_length=64"])
    assert r["model_flops_per_token"] == bench.flops_per_token(cfg)
    assert r["tokens_per_s_per_gpu"] > 0
    assert math.isclose(r["tokens_per_s_per_gpu"] * r["step_time_s"], 4 * 64, rel_tol=1e-6)
    assert math.isclose(r["model_tflops_per_gpu"], r["model_flops_per_token"] * r["tokens_per_s_per_gpu"] / 1e12)
    assert r["peak_memory_bytes"] > 100 * 2**20 and r["peak_memory_kind"].startswith("peak RSS")


@pytest.mark.parametrize("name", ["fp8_delayed", "fp8_current", "fp8_blockwise"])
def test_fp8_rejected_on_cpu(name):
    with pytest.raises(ConfigError, match=f"precision.name={name} needs a CUDA GPU"):
        validate(load_config([f"precision={name}"]), 1)
    # Planning a GPU job elsewhere skips the device checks only.
    validate(load_config([f"precision={name}"]), 1, check_device=False)


def test_bench_fp8_on_cpu_fails_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["precision=fp8_current", "--steps", "1"])
    assert e.value.code == 2
    assert "precision.name=fp8_current needs a CUDA GPU" in capsys.readouterr().err


def test_optimizer_offload_rules():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible: on CPU the optimizer already runs"):
        validate(load_config(["train.optimizer_cpu_offload=true", "parallel.distributed_optimizer=true"]), 1)
    with pytest.raises(ConfigError, match="needs parallel.distributed_optimizer=true"):
        validate(load_config(["train.optimizer_cpu_offload=true"]), 1, check_device=False)
    with pytest.raises(ConfigError, match=r"needs precision.fp8_format=e4m3 \(got hybrid\)"):
        validate(load_config(["precision=fp8_blockwise", "precision.fp8_format=hybrid"]), 1, check_device=False)
    with pytest.raises(ConfigError, match="train.recompute='some'"):
        validate(load_config(["train.recompute=some"]), 1)


def test_precision_maps_to_megatron_fp8_recipes():
    import torch
    from megatron.core.enums import Fp8Recipe

    from megatron_ext.transformer import transformer_config

    expected = {"fp8_delayed": ("hybrid", "delayed"), "fp8_current": ("hybrid", "tensorwise"),
                "fp8_blockwise": ("e4m3", "blockwise")}
    for name, (fmt, recipe) in expected.items():
        t = transformer_config(load_config([f"precision={name}", "precision.fp8_backend=te"]))
        assert (t.fp8, t.fp8_recipe, t.params_dtype, t.bf16) == (fmt, recipe, torch.bfloat16, True), name
        assert recipe in {r.value for r in Fp8Recipe}
    t = transformer_config(load_config(["precision=fp8_delayed"]))
    assert (t.fp8_amax_history_len, t.fp8_amax_compute_algo) == (1024, "max")
    assert transformer_config(load_config(["precision=bf16"])).fp8 is None
    # Through torchao (megatron_ext.fp8) Megatron-Core sees no FP8 recipe: the linear layers are marked instead.
    t = transformer_config(load_config(["precision=fp8_current", "precision.fp8_backend=torchao"]))
    assert (t.fp8, t.params_dtype) == (None, torch.bfloat16)


def _recompute_runs(rank, world_size, modes):
    from megatron_ext.loop import train

    out = {}
    for mode in modes:
        cfg = load_config(["data.seq_length=64", "train.global_batch_size=4", "train.steps=2",
                           f"train.recompute={mode}"])
        validate(cfg, world_size)
        result = train(cfg, bench.SyntheticStage())
        t = result.runtime.transformer_config
        out[mode] = ([(h["loss"], h["grad_norm"]) for h in result.history],
                     (t.recompute_granularity, t.recompute_method, t.recompute_num_layers))
    return out


def test_recompute_same_training():
    (runs,) = run_on_ranks(_recompute_runs, 1, ["none", "selective", "full"])
    assert runs["none"][1] == (None, None, None)
    assert runs["selective"][1] == ("selective", None, None)
    assert runs["full"][1] == ("full", "uniform", 1)
    for mode in ("selective", "full"):
        for (loss, gn), (ref_loss, ref_gn) in zip(runs[mode][0], runs["none"][0]):
            assert math.isclose(loss, ref_loss, rel_tol=1e-5) and math.isclose(gn, ref_gn, rel_tol=1e-4), mode


def test_synthetic_documents_end_with_eod():
    ds = bench.SyntheticDataset(2, 256, 151936, seed=1, eod=bench.QWEN_EOD)
    ids = list(ds[0]["tokens"]) + [ds[0]["labels"][-1]]
    ends = [i for i, x in enumerate(ids) if x == bench.QWEN_EOD]
    assert len(ends) >= 2 and all(257 // 8 <= b - a <= 257 // 2 for a, b in zip([-1] + ends, ends))
    doc = ids[ends[0] + 1:ends[1]]  # a whole document: its second half repeats its first
    half = (len(doc) + 1) // 2
    assert doc[half:] == doc[:len(doc) - half]
    assert bench.SyntheticDataset(2, 256, 151936, seed=1)[0]["tokens"].max() < bench.SYNTHETIC_VOCAB
    short = bench.SyntheticDataset(2, 256, 151936, seed=1, eod=bench.QWEN_EOD, doc_length=16)[0]["tokens"].tolist()
    ends = [i for i, x in enumerate(short) if x == bench.QWEN_EOD]
    assert len(ends) >= 10 and all(8 <= b - a <= 24 for a, b in zip(ends, ends[1:]))


def test_compare_refused_where_the_peer_cannot_match():
    args, overrides = bench.parse_args(["--compare", "transformers"])
    with pytest.raises(ConfigError, match="--compare runs the transformers peer in one process; got world size 2"):
        bench.bench_config(args, overrides + ["parallel.tp=2"], 2)
    with pytest.raises(ConfigError, match="--compare does not support cpt.document_mask=true"):
        bench.bench_config(args, ["stage=long_context", "parallel.cp=1", "train.global_batch_size=1"], 1)
    with pytest.raises(SystemExit):
        bench.parse_args(["--compare", "transformers", "--data", "corpus"])
    with pytest.raises(ConfigError, match="--doc-length 64 shapes synthetic packed documents"):
        bench.bench_config(*bench.parse_args(["--doc-length", "64"]), 1)
    # A long-context stage needs no data.paths with synthetic data.
    args, overrides = bench.parse_args(["stage=long_context", "parallel.cp=1", "train.global_batch_size=1"])
    assert bench.bench_config(args, overrides, 1).cpt.document_mask


def _compare_runs(rank, world_size, tmp, runs):
    out = {}
    for name, argv in runs.items():
        path = f"{tmp}/{name}.json"
        assert bench.main(argv + ["--json", path]) == 0
        out[name] = json.loads(Path(path).read_text())
    return out


def test_bench_compare_transformers_cpu(tmp_path):
    """Ours and the transformers peer in one run, dense and MoE, plus a document-masked run."""
    from tools.estimate_memory import estimate

    common = ["data.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=2",
              "--steps", "2", "--warmup", "1"]
    runs = {m: [f"model={m}", *common, "--compare", "transformers"] for m in ("qwen3_debug", "qwen2_moe_debug")}
    runs["documents"] = ["stage=long_context", "parallel.cp=1", "data.seq_length=128", "train.global_batch_size=2",
                         "train.micro_batch_size=1", "--steps", "1", "--warmup", "0"]
    (results,) = run_on_ranks(_compare_runs, 1, str(tmp_path), runs)
    for model in ("qwen3_debug", "qwen2_moe_debug"):
        r, p = results[model], results[model]["transformers"]
        cfg = load_config([f"model={model}"])
        assert p["params"] == estimate(cfg, 1)["stages"][0]["params"], model  # the same architecture
        assert (p["attn_implementation"], p["precision"], p["optimizer"]) == ("sdpa", "fp32", "torch.optim.AdamW(fused=False)")
        assert len(p["losses"]) == len(r["losses"]) == 3 and all(math.isfinite(x) for x in p["losses"])
        # Different random inits: both start near ln(vocab) and learn, neither equal to the other.
        for losses in (r["losses"], p["losses"]):
            assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 0.3 and losses[-1] < losses[0], (model, losses)
        assert p["tokens_per_s_per_gpu"] > 0 and p["mfu"] is None
        assert math.isclose(p["model_tflops_per_gpu"], r["model_flops_per_token"] * p["tokens_per_s_per_gpu"] / 1e12)
        assert math.isclose(r["ours_over_transformers"], r["tokens_per_s_per_gpu"] / p["tokens_per_s_per_gpu"])
    assert results["qwen2_moe_debug"]["transformers"]["experts_implementation"] is not None
    docs = results["documents"]
    assert docs["seq_length"] == 128 and math.isfinite(docs["losses"][0]) and "transformers" not in docs


def test_bench_profile_after_timed_steps(tmp_path):
    """--profile N: N extra steps under torch.profiler after the timed ones; the JSON ranks
    operators by self time and the timed numbers cover --steps only."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench_train", "model=qwen3_debug", "data.seq_length=64", "train.global_batch_size=2",
         "--steps", "1", "--warmup", "1", "--profile", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["timed_steps"] == 1 and len(r["losses"]) == 2
    rows = r["profile"]
    assert 0 < len(rows) <= 30 and "profile: top operators by self host time over 1 step(s)" in proc.stdout
    assert r["profile_total_ms"] >= sum(row["self_ms"] for row in rows) - 1e-6
    assert all(a["self_ms"] >= b["self_ms"] for a, b in zip(rows, rows[1:]))
    assert any(row["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for row in rows)
    assert 0 < sum(row["share"] for row in rows) <= 1.0 + 1e-9
    # The same step's Python functions (and the builtins they call) by own time, over the whole
    # step: the forward's matmuls and the autograd engine's backward among them.
    python = r["profile_python"]
    assert 0 < len(python) <= 15 and "profile: top Python functions by own host time" in proc.stdout
    assert all(a["self_ms"] >= b["self_ms"] for a, b in zip(python, python[1:]))
    assert r["profile_python_total_ms"] >= sum(row["self_ms"] for row in python) - 1e-6
    names = " ".join(row["name"] for row in python)
    assert "matmul" in names and "run_backward" in names, python


def test_python_profile_rows_name_functions_from_their_package():
    """The Python profile's rows: this repository's functions as path:line(function) from the
    repository root, installed packages' from the package on, builtins by name."""
    import cProfile

    import torch

    from megatron.core.utils import divide
    from megatron_ext.cli import load_config as load

    profile = cProfile.Profile()
    profile.enable()
    load([])
    divide(4, 2)
    torch.ones(2).sum()
    profile.disable()
    rows, total = bench.python_rows(profile, 100000)
    names = [row["name"] for row in rows]
    assert any(n.startswith("megatron_ext/cli.py:") and n.endswith("(load_config)") for n in names), names
    assert any(n.startswith("megatron/core/utils.py:") and n.endswith("(divide)") for n in names), names
    assert "<method 'sum' of 'torch._C.TensorBase' objects>" in names
    assert total >= sum(row["self_ms"] for row in rows) - 1e-6
