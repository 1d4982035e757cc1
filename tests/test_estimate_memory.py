"""The memory estimator against what Megatron-Core really allocates on CPU ranks.

Parameters, DDP gradient buffers and Adam state are counted exactly by the estimator, so each
rank's measured numbers must equal its estimate for every debug model and layout. Parameter
totals of the published sizes are checked against transformers. Activation memory cannot be
measured on CPU (the local spec runs unfused attention and keeps other tensors than fused GPU
kernels do); it is an estimate, checked here only against values worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.cli import load_config
from megatron_ext.config import ConfigError
from megatron_ext.layout import Layout
from tests.gloo import run_on_ranks
from tools import estimate_memory as em

DEBUG = ["qwen3_debug", "qwen2_debug", "qwen3_moe_debug", "qwen2_moe_debug"]
MOE = ["qwen3_moe_debug", "qwen2_moe_debug"]
PUBLISHED = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "model").glob("*.yaml")
                   if not p.stem.endswith("_debug"))


def _tp2(model):
    # Megatron-Core requires sequence parallelism for MoE with TP > 1.
    return ["parallel.tp=2"] + (["parallel.sp=true"] if model in MOE else [])


CASES = {
    1: [[f"model={m}"] for m in DEBUG] + [["model=qwen3_moe_debug", "precision=bf16"]],
    2: [[f"model={m}", *layout] for m in DEBUG
        for layout in (_tp2(m), ["parallel.pp=2"], ["parallel.distributed_optimizer=true"])]
    + [[f"model={m}", "parallel.ep=2", *extra] for m in MOE
       for extra in ([], ["parallel.distributed_optimizer=true"])]
    + [["model=qwen2_debug", "precision=bf16", "parallel.distributed_optimizer=true"]]
    # Buckets of the overlapped gradient reduction, each padded for the distributed optimizer.
    + [["model=qwen3_moe_debug", "parallel.ep=2", "parallel.distributed_optimizer=true",
        "parallel.grad_bucket_size=5000"],
       ["model=qwen2_debug", "parallel.distributed_optimizer=true", "parallel.grad_bucket_size=5000"]],
}


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def _optimizer_bytes(optimizer, model_storages) -> int:
    """Adam's exp_avg/exp_avg_sq plus any main (master) params not sharing model storage."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        assert inner.state, "optimizer state was not initialised"
        for state in inner.state.values():
            total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        for group in inner.param_groups:
            total += sum(p.numel() * p.element_size() for p in group["params"]
                         if p.untyped_storage().data_ptr() not in model_storages)
    return total


def _measure(rank, world_size, cases):
    """Build each case, take one optimizer step on zero gradients (which creates Adam's state)
    and count this rank's parameters, grad buffers and optimizer state."""
    from megatron.core import parallel_state

    from megatron_ext.build import build
    from megatron_ext.config import validate

    out = []
    for overrides in cases:
        cfg = load_config(overrides)
        validate(cfg, world_size)
        rt = build(cfg)
        params = [p for chunk in rt.model for p in chunk.module.parameters()]
        buffers = [b for chunk in rt.model for b in chunk.buffers + chunk.expert_parallel_buffers]
        for chunk in rt.model:
            chunk.zero_grad_buffer()
        rt.optimizer.step()
        out.append(dict(
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(with_context_parallel=True),
            edp_rank=parallel_state.get_expert_data_parallel_rank(),
            params=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            grad_bytes=sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
            optimizer_bytes=_optimizer_bytes(rt.optimizer, _storages(params + [b.param_data for b in buffers
                                                                              if b.param_data is not None])),
        ))
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def measured():
    return {world: run_on_ranks(_measure, world, cases) for world, cases in CASES.items()}


def _estimate(overrides, world, pp_rank, dp_rank, edp_rank):
    from megatron_ext.transformer import transformer_config

    cfg = load_config(overrides)
    return em.rank_static(cfg, Layout.of(cfg, world), transformer_config(cfg), pp_rank, dp_rank, edp_rank)


@pytest.mark.parametrize("world,index", [(w, i) for w, cases in CASES.items() for i in range(len(cases))],
                         ids=lambda v: str(v))
def test_static_memory_equals_measured(measured, world, index):
    overrides = CASES[world][index]
    for rank, results in enumerate(measured[world]):
        got = results[index]
        want = _estimate(overrides, world, got["pp_rank"], got["dp_rank"], got["edp_rank"])
        assert got["params"] > 0 and got["optimizer_bytes"] > 0
        assert {k: got[k] for k in want} == want, (overrides, rank)


def _hf_count(name: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from models import registry

    hf_config = AutoConfig.for_model(**registry.config_to_hf(load_config([f"model={name}"]).model))
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config).parameters())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_parameter_totals(name):
    """One rank holds the whole model: its count equals transformers'; split over two pipeline
    stages the counts add up to it (plus the last stage's copy of a tied embedding)."""
    from megatron_ext.transformer import transformer_config

    total = _estimate([f"model={name}"], 1, 0, 0, 0)["params"]
    assert total == _hf_count(name)
    cfg = load_config([f"model={name}", "parallel.pp=2"])
    lay = Layout.of(cfg, 2)
    stages = [em.rank_static(cfg, lay, transformer_config(cfg), r)["params"] for r in range(2)]
    tied = cfg.model.vocab_size * cfg.model.hidden_size if cfg.model.tie_word_embeddings else 0
    assert sum(stages) == total + tied


def test_activation_estimate_by_hand():
    """Activation memory is an estimate; check the formula's arithmetic on worked examples.

    qwen3_debug: h=64, a=4 heads, g=2 groups, d=32, f=192, V=151936, 4 layers; seq 128, mbs 2.
    """
    # fp32, one rank: 256 tokens. Per token and layer (elements): attention 2h + (a+2g)d + ad +
    # (a+g)d = 128+256+128+192 = 704; MLP 2h + 3f = 704. Head: 2h + fp32 softmax over V.
    est = em.estimate(load_config(["model=qwen3_debug", "data.seq_length=128", "train.micro_batch_size=2"]), 1)
    (stage,) = est["stages"]
    assert stage["in_flight_microbatches"] == 1
    assert stage["activation_bytes"] == 4 * 256 * (4 * 1408 + 128) + 4 * 256 * 151936
    # bf16, TP=2 + SP, PP=2 on 4 ranks (DP=1, 4 micro-batches): n = 128 tokens per rank in the
    # sequence-parallel regions. Per layer: attention 2*128*64 + 256*(8*32 + 4*32 + 6*32)/2 =
    # 90112, MLP 2*128*64 + 3*256*192/2 = 90112 elements, 2 bytes each.
    cfg = load_config(["model=qwen3_debug", "data.seq_length=128", "train.micro_batch_size=2",
                       "train.global_batch_size=8", "precision=bf16", "parallel.tp=2", "parallel.sp=true",
                       "parallel.pp=2"])
    first, last = em.estimate(cfg, 4)["stages"]
    layers = 2 * 2 * 180224
    assert (first["in_flight_microbatches"], last["in_flight_microbatches"]) == (2, 1)
    assert first["activation_bytes"] == 2 * (layers + 2 * 128 * 64)  # + stage output kept
    assert last["activation_bytes"] == layers + 2 * 2 * 128 * 64 + 4 * 256 * 151936 // 2


def test_interleaved_in_flight():
    """Megatron's interleaved warmup: 2*(PP-r-1) + (VPP-1)*PP, plus one, capped at M*VPP."""
    lay = Layout.of(load_config(["model=qwen3_debug", "parallel.pp=2", "parallel.vpp=2"]), 2)
    assert [em.in_flight(lay, r, 8) for r in range(2)] == [5, 3]
    assert em.in_flight(lay, 0, 2) == 4


def test_cli_json_and_bad_layouts(capsys):
    assert em.main(["model=qwen3_moe_debug", "parallel.ep=2", "--world-size", "4", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["layout"]["edp"] == 2 and est["layout"]["dp"] == 4
    with pytest.raises(SystemExit):
        em.main(["model=qwen3_moe_debug", "parallel.ep=3"])
    assert "not divisible by parallel.ep=3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="num_query_groups"):
        em.estimate(load_config(["model=qwen3_debug", "parallel.tp=4"]), 4)
