"""GPU-only checks (`pytest -m gpu`): Transformer Engine spec vs local spec logits, FP8 loss
tracking BF16, and the bench on a GPU. Skipped without CUDA + Transformer Engine."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gloo import run_on_ranks

REPO = Path(__file__).resolve().parent.parent
_HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and _HAVE_TE),
                       reason=f"needs a CUDA GPU and Transformer Engine (CUDA available: "
                              f"{torch.cuda.is_available()}, transformer_engine installed: {_HAVE_TE})"),
]
# A shape big enough for FP8 GEMMs to matter, small enough for one GPU in seconds.
MEDIUM = ["model=qwen3_debug", "model.hidden_size=512", "model.ffn_hidden_size=1536",
          "model.num_attention_heads=8", "model.num_query_groups=4", "model.head_dim=64",
          "data.seq_length=512", "train.micro_batch_size=4", "train.global_batch_size=8"]
# FP8 band: per step |loss_fp8 - loss_bf16| <= 3% of the BF16 loss, and over the last 5 steps
# the mean differs by <= 1.5%.
FP8_STEP_BAND, FP8_TAIL_BAND = 0.03, 0.015


def _te_local_logits(rank, world_size, model, grouped_gemm, packed=False):
    """Logits of the TE spec and the local spec built from the same bf16 weights (with `packed`:
    one thd sequence of three documents, as the CPT and SFT stages pack them)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.data import packed_seq_params
    from megatron_ext.spec import _substitute
    from megatron_ext.transformer import transformer_config

    cfg = load_config([f"model={model}", "precision=bf16", f"moe.grouped_gemm={grouped_gemm}"])
    init_parallel(cfg)
    tcfg = transformer_config(cfg)

    def build(te: bool):
        spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=te, normalization="RMSNorm")
        return GPTModel(tcfg, spec if te else _substitute(spec), cfg.model.vocab_size, 4096,
                        share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
                        position_embedding_type="rope", rotary_base=int(cfg.model.rope_theta)).cuda().eval()

    local, te = build(False), build(True)
    te_state = te.state_dict()
    # TE fuses the pre-attention/pre-MLP RMSNorm into the following linear layer.
    renames = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    loaded = set()
    for name, value in local.state_dict().items():
        if "_extra_state" in name:
            continue
        # Grouped experts: the local [experts, out, in] weight is TE GroupedLinear's weight0, weight1, ...
        pieces = [(f"{name}{i}", w) for i, w in enumerate(value)] if value.dim() == 3 else [(name, value)]
        for target, piece in pieces:
            if target not in te_state:
                target = next((target.replace(a, b) for a, b in renames.items() if target.endswith(a)), target)
            assert target in te_state, f"no TE counterpart for {name} ({target})"
            te_state[target].copy_(piece)
            loaded.add(target)
    missing = [k for k in te_state if "_extra_state" not in k and k not in loaded]
    assert not missing, f"TE weights not set from the local model: {missing}"
    if packed:
        cu = torch.tensor([0, 100, 356, 512], dtype=torch.int32)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 512), device="cuda")
        positions = torch.cat([torch.arange(b - a) for a, b in zip(cu.tolist(), cu[1:].tolist())])[None].cuda()
        kwargs = {"packed_seq_params": packed_seq_params(cu)}
    else:
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 256), device="cuda")
        positions, kwargs = torch.arange(256, device="cuda").expand(2, -1), {}
    with torch.no_grad():
        return [m(tokens, positions, attention_mask=None, **kwargs).float().cpu() for m in (local, te)]


@pytest.mark.parametrize("model,grouped_gemm,packed", [
    ("qwen2_debug", "null", False), ("qwen3_debug", "null", False),
    # Experts one by one (SequentialMLP) and as grouped GEMMs (TEGroupedMLP vs. GroupedExperts).
    ("qwen2_moe_debug", "false", False), ("qwen2_moe_debug", "true", False),
    ("qwen3_moe_debug", "false", False), ("qwen3_moe_debug", "true", False),
    # Packed documents (thd): TE's attention and RoPE read the boundaries on the GPU.
    ("qwen3_debug", "null", True),
])
def test_te_spec_matches_local_spec_bf16(model, grouped_gemm, packed):
    (local, te), = run_on_ranks(_te_local_logits, 1, model, grouped_gemm, packed)
    scale = local.std().item()
    diff = (te - local).abs()
    # BF16 tolerance: different kernels (fused vs unfused attention, fused norm+GEMM) round
    # differently; the logits must agree to a few bf16 ulps of their spread.
    assert diff.mean().item() <= 0.01 * scale and diff.max().item() <= 0.1 * scale, \
        (diff.mean().item(), diff.max().item(), scale)


def _losses(rank, world_size, overrides):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from tools.bench_train import SyntheticStage

    cfg = load_config(MEDIUM + overrides)
    validate(cfg, world_size)
    return [h["loss"] for h in train(cfg, SyntheticStage()).history]


@pytest.mark.parametrize("precision", ["fp8_delayed", "fp8_current", "fp8_blockwise"])
def test_fp8_loss_tracks_bf16(precision):
    from megatron_ext.precision import fp8_support

    ok, why = fp8_support(precision)
    if not ok:
        pytest.skip(f"{precision} {why}")
    steps = ["train.steps=30", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=5"]
    (bf16,), (fp8,) = (run_on_ranks(_losses, 1, steps + [f"precision={p}"]) for p in ("bf16", precision))
    assert bf16[-1] < bf16[0] - 1.0, bf16  # the comparison is over a run that learns
    for step, (a, b) in enumerate(zip(bf16, fp8), 1):
        assert math.isfinite(b) and abs(a - b) <= FP8_STEP_BAND * a, (step, a, b)
    tail_bf16, tail_fp8 = sum(bf16[-5:]) / 5, sum(fp8[-5:]) / 5
    assert abs(tail_fp8 - tail_bf16) <= FP8_TAIL_BAND * tail_bf16, (tail_bf16, tail_fp8)


@pytest.mark.parametrize("precision", ["bf16", "fp8_current"])
def test_bench_runs_on_gpu(tmp_path, precision):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench_train", *MEDIUM, f"precision={precision}",
                           "--steps", "3", "--warmup", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["spec"] == "transformer-engine" and r["device"] != "cpu"
    assert r["peak_memory_kind"] == "torch.cuda.max_memory_allocated" and r["peak_memory_bytes"] > 0
    assert r["tokens_per_s_per_gpu"] > 0 and all(math.isfinite(x) for x in r["losses"])
    if r["peak_tflops"] is not None:
        assert math.isclose(r["mfu"], r["model_tflops_per_gpu"] / r["peak_tflops"])
