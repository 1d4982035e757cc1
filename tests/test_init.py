"""Initial weights depend on the seed and the architecture only (megatron_ext.init).

Every layout's pieces must equal the single-process model's tensors exactly (bitwise), and the
rules must draw what Megatron-Core itself would draw: the same constants, and random weights
with the standard deviation of the init function Megatron gives that weight.
"""

import pytest
import torch

from tests.forked_ranks import run_on_ranks

SMALL = ["model.vocab_size=1024", "train.seed=7"]
MODELS = {
    "qwen3": ["model=qwen3_debug"],
    "qwen2_tied": ["model=qwen2_debug"],          # QKV bias, tied embeddings
    "qwen3_moe": ["model=qwen3_moe_debug"],
    "qwen2_moe": ["model=qwen2_moe_debug"],       # shared expert with its gate, a dense layer
    "qwen3_moe_sequential": ["model=qwen3_moe_debug", "moe.grouped_gemm=false"],
}
# 4 ranks each: every kind of split, plus pipeline stages, virtual stages and expert ranks.
LAYOUTS = {
    "qwen3": [["parallel.tp=2", "parallel.pp=2"], ["parallel.pp=2", "parallel.vpp=2"]],
    "qwen2_tied": [["parallel.pp=2", "parallel.tp=2"]],
    "qwen3_moe": [["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"],
                  ["parallel.ep=4"], ["parallel.pp=2", "parallel.ep=2"]],
    "qwen2_moe": [["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]],
    "qwen3_moe_sequential": [["parallel.ep=2", "parallel.tp=2", "parallel.sp=true", "parallel.etp=1"]],
}


def _pieces(rank, world_size, runs, megatron_init=False):
    """Build each config in turn; return per run {global name: (local name, split, piece)}."""
    from megatron.core import parallel_state

    from megatron_ext import init
    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.grouped_experts import sequential_named_parameters
    from megatron_ext.placement import global_name, split
    from megatron_ext.transformer import transformer_config

    if megatron_init:
        init.initialize = lambda *args, **kwargs: None
    out = []
    for overrides in runs:
        cfg = load_config(overrides)
        validate(cfg, world_size)
        init_parallel(cfg)
        chunks = build_model(cfg, transformer_config(cfg))
        out.append({global_name(c, n, cfg.model): (n, split(n), p.detach().clone())
                    for c in chunks for n, p in sequential_named_parameters(c)})
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def single_process():
    names = list(MODELS)
    states = run_on_ranks(_pieces, 1, [SMALL + MODELS[n] for n in names])[0]
    return {n: {k: v[2] for k, v in s.items()} for n, s in zip(names, states)}


def test_every_layout_starts_from_the_single_process_weights(single_process):
    from megatron_ext.placement import shard_index

    runs = [(name, layout) for name, layouts in LAYOUTS.items() for layout in layouts]
    per_rank = run_on_ranks(_pieces, 4, [SMALL + MODELS[name] + layout for name, layout in runs])
    for i, (name, layout) in enumerate(runs):
        ref = single_process[name]
        seen = set()
        for rank_states in per_rank:
            for gname, (local, (dim, size, r), piece) in rank_states[i].items():
                if gname == "output_layer.weight" and gname not in ref:
                    gname = "embedding.word_embeddings.weight"  # the last stage's copy of tied embeddings
                full = ref[gname]
                want = full if dim is None or size == 1 else full.index_select(
                    dim, shard_index(local, full.shape[dim], size, r))
                assert torch.equal(piece, want), f"{name} {layout}: {gname} (rank piece {r} of {size})"
                seen.add(gname)
        assert seen == set(ref), f"{name} {layout}: missing {sorted(set(ref) - seen)[:5]}"


def test_rules_draw_what_megatron_draws(single_process):
    """Constants equal Megatron's; random weights have Megatron's standard deviation (within
    sampling error) and are not Megatron's own draw (they are re-drawn here)."""
    names = list(MODELS)
    native = run_on_ranks(_pieces, 1, [SMALL + MODELS[n] for n in names], True)[0]
    for name, state in zip(names, native):
        for gname, (_, _, theirs) in state.items():
            ours = single_process[name][gname]
            if theirs.unique().numel() == 1:
                assert torch.equal(ours, theirs), f"{name}: {gname} should be the constant {theirs.flatten()[0]}"
                continue
            assert not torch.equal(ours, theirs), f"{name}: {gname} was not re-drawn"
            tol = 4 / theirs.numel() ** 0.5 + 0.02
            assert abs(ours.std() / theirs.std() - 1) < tol, (name, gname, ours.std(), theirs.std())
            assert abs(ours.mean()) < 4 * theirs.std() / ours.numel() ** 0.5, (name, gname, ours.mean())


def test_unknown_parameter_is_refused():
    from megatron.core.transformer import TransformerConfig

    from megatron_ext import init

    tcfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    with pytest.raises(ValueError, match="no rule for parameter 'decoder.layers.0.mystery.weight'"):
        init._constant("decoder.layers.0.mystery.weight", tcfg)
