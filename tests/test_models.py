"""Qwen families: HF config <-> ModelConfig for every named size, parameter counts against
transformers, and the weight-mapping layouts (QKV interleave, gate/up, expert expansion)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_ext.cli import load_config
from models import mapping, registry
from models.hf_config import HFConfigError
from tests.forked_ranks import run_on_ranks

MODEL_NAMES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "model").glob("*.yaml"))
PUBLISHED = ["qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_7b", "qwen2_5_72b", "qwen3_0_6b", "qwen3_8b", "qwen3_32b",
             "qwen2_57b_a14b", "qwen3_30b_a3b", "qwen3_235b_a22b"]


def test_named_sizes_present():
    missing = set(PUBLISHED + ["qwen2_debug", "qwen3_debug", "qwen2_moe_debug", "qwen3_moe_debug"]) - set(MODEL_NAMES)
    assert not missing, f"conf/model lacks {sorted(missing)}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hf_config_round_trip(name):
    """ModelConfig -> HF config.json -> transformers config -> ModelConfig is the identity."""
    m = load_config([f"model={name}"]).model
    hf = registry.config_to_hf(m)
    hf_config = AutoConfig.for_model(**hf)  # transformers accepts every field we write
    assert registry.config_from_hf(hf, name=m.name) == m
    # transformers config objects fill in their own sliding-window defaults (and drop the
    # window length while sliding is off); the converters read config.json, checked above.
    from_object = registry.config_from_hf(hf_config, name=m.name)
    ignored = dict(sliding_window=m.sliding_window, max_window_layers=m.max_window_layers)
    assert dataclasses.replace(from_object, **ignored) == m


def test_published_values_spot_check():
    """A few published facts the families must reproduce."""
    assert registry.config_to_hf(load_config(["model=qwen2_5_0_5b"]).model)["tie_word_embeddings"] is True
    q3 = registry.config_to_hf(load_config(["model=qwen3_0_6b"]).model)
    assert q3["head_dim"] == 128 and q3["hidden_size"] // q3["num_attention_heads"] == 64
    moe = registry.config_to_hf(load_config(["model=qwen2_57b_a14b"]).model)
    assert moe["norm_topk_prob"] is False and moe["shared_expert_intermediate_size"] == 20480
    assert registry.config_to_hf(load_config(["model=qwen3_235b_a22b"]).model)["num_experts"] == 128


def _megatron_counts(rank, world_size, names):
    """Build each named model at TP=PP=1 on the meta device (no memory) and count parameters."""
    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.transformer import transformer_config

    counts = {}
    for name in names:
        cfg = load_config([f"model={name}"])
        init_parallel(cfg)
        tcfg = transformer_config(cfg)
        tcfg.perform_initialization = False
        with torch.device("meta"):
            chunks = build_model(cfg, tcfg)  # the builder logs this same count
        counts[name] = sum(p.numel() for c in chunks for p in c.parameters())
    return counts


def test_parameter_counts_match_transformers():
    """The model builder's parameter count equals the HF model's for every named size."""
    counts = run_on_ranks(_megatron_counts, 1, MODEL_NAMES)[0]
    for name in MODEL_NAMES:
        hf_config = AutoConfig.for_model(**registry.config_to_hf(load_config([f"model={name}"]).model))
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(hf_config)
        assert counts[name] == sum(p.numel() for p in hf_model.parameters()), name
    assert counts["qwen2_5_0_5b"] == 494_032_768  # published: Qwen2.5-0.5B has 0.49B parameters


def test_moe_layer_freq_from_hf():
    base = dict(model_type="qwen2_moe", num_hidden_layers=4, hidden_size=8, intermediate_size=16,
                num_attention_heads=2, vocab_size=32, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=4, shared_expert_intermediate_size=8)
    assert registry.config_from_hf(base).moe_layer_freq is None
    assert registry.config_from_hf({**base, "mlp_only_layers": [0, 2]}).moe_layer_freq == [0, 1, 0, 1]
    assert registry.config_from_hf({**base, "decoder_sparse_step": 2}).moe_layer_freq == [0, 1, 0, 1]


@pytest.mark.parametrize("bad,field", [({"model_type": "llama"}, "llama"), ({"hidden_act": "gelu"}, "hidden_act"),
                                       ({"use_sliding_window": True}, "use_sliding_window"),
                                       ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")])
def test_unsupported_hf_configs_named(bad, field):
    hf = {**registry.config_to_hf(load_config(["model=qwen3_debug"]).model), **bad}
    with pytest.raises(HFConfigError, match=field):
        registry.config_from_hf(hf)


def test_qkv_layout_is_grouped_and_invertible():
    """linear_qkv rows are [q heads of group g, k_g, v_g] per group, and split inverts fuse."""
    m = load_config(["model=qwen3_debug"]).model  # 4 heads, 2 groups, head_dim 32
    hd = m.kv_channels
    q = torch.arange(4 * hd, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    k = 1000 + torch.arange(2 * hd, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    v = 2000 + torch.arange(2 * hd, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    fused = mapping.fuse("qkv", [q, k, v], m)
    group0 = fused[: 4 * hd, 0]
    assert torch.equal(group0[: 2 * hd], q[: 2 * hd, 0])  # two query heads of group 0
    assert torch.equal(group0[2 * hd: 3 * hd], k[:hd, 0]) and torch.equal(group0[3 * hd:], v[:hd, 0])
    for a, b in zip(mapping.split("qkv", fused, m), (q, k, v)):
        assert torch.equal(a, b)
    bias = [t[:, 0].contiguous() for t in (q, k, v)]
    assert all(torch.equal(a, b) for a, b in zip(mapping.split("qkv", mapping.fuse("qkv", bias, m), m), bias))


def test_expand_covers_moe_layers_and_experts():
    m = load_config(["model=qwen2_moe_debug"]).model  # layer 0 MoE (4 experts + shared), layer 1 dense
    names = [e.mcore for e in mapping.expand(registry.family(m.family).RULES, m)]
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in names
    assert "decoder.layers.0.mlp.shared_experts.gate_weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names
    assert not any(n.startswith("decoder.layers.1.mlp.experts") for n in names)
    assert "decoder.layers.0.mlp.linear_fc1.weight" not in names
    tied = load_config(["model=qwen2_debug"]).model
    assert "output_layer.weight" not in [e.mcore for e in mapping.expand(registry.family("qwen2").RULES, tied)]
