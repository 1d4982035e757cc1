"""Continued pretraining on CPU: debug model -> HF -> Megatron -> CPT on a math mixture -> HF.

The end-to-end test starts from a (random) qwen3_debug model exported to HF, converts it back,
checks the converted weights are what training starts from, runs CPT with a mixture that
shifts towards math at step 4, exports to HF, and measures per-token loss with transformers on
held-out synthetic math and on general text, before and after.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import numpy as np
import pytest
import torch

from data_prep.synth import math_gen
from posttrain.cpt import mixture_plan
from tests.forked_ranks import run_on_ranks

STEPS, GBS, SEQ = 12, 4, 64


def test_mixture_plan_follows_each_phase():
    phases = [(0, [0.5, 0.5]), (5, [0.2, 0.8]), (9, [1.0, 0.0])]
    which, index = mixture_plan(phases, 10, 120)
    assert np.bincount(which[:50], minlength=2).tolist() == [25, 25]
    assert np.bincount(which[50:90], minlength=2).tolist() == [8, 32]
    assert np.bincount(which[90:], minlength=2).tolist() == [30, 0]
    for k in (0, 1):  # each dataset is read in order, without gaps or repeats
        assert index[which == k].tolist() == list(range(int((which == k).sum())))
    # Every step's batch of 10 already follows its phase's weights.
    assert all(np.bincount(which[s:s + 10], minlength=2).tolist() == [2, 8] for s in range(50, 90, 10))


def _math_texts(n_per_kind: int, seed: int):
    return [r["text"] for k in sorted(math_gen.KINDS) for r in math_gen.generate(k, n_per_kind, seed)]


def _prepare_math(root):
    from data_prep.synth.records import write_jsonl
    from data_prep.tokenize import main as tokenize_main

    write_jsonl(({"text": t} for t in _math_texts(80, 0)), f"{root}/math.jsonl")
    assert tokenize_main(["--input", f"{root}/math.jsonl", "--output-prefix", f"{root}/math", "--tokenizer",
                          "qwen3", "--append-eod", "--quiet"]) == 0
    return f"{root}/math"


def _pipeline(rank, world, root):
    from pathlib import Path

    from megatron_ext import build, checkpoint, data
    from megatron_ext.cli import load_config
    from megatron_ext.loop import train
    from posttrain.cpt import CPTStage
    from tools.convert import hf_to_mcore, mcore_to_hf

    base = ["model=qwen3_debug", "data.tokenizer=qwen3", f"data.seq_length={SEQ}"]
    rt = build.build(load_config(base + [f"checkpoint.dir={root}/debug"]))
    checkpoint.save(rt, checkpoint.TrainState())
    build.parallel_state.destroy_model_parallel()
    mcore_to_hf(f"{root}/debug", f"{root}/hf_base")
    hf_to_mcore(f"{root}/hf_base", f"{root}/mcore_base")
    general = str(data.build_sample_corpus(Path(root) / "general", "qwen3"))
    cfg = load_config(base + [
        "stage=cpt_math", f"checkpoint.load={root}/mcore_base", f"checkpoint.dir={root}/cpt", "checkpoint.save_interval=0",
        f"data.paths=[{general},{_prepare_math(root)}]", "cpt.mixture_steps=[0,4]",
        "cpt.mixture_weights=[[0.5,0.5],[0.2,0.8]]", f"train.steps={STEPS}", "train.micro_batch_size=2",
        f"train.global_batch_size={GBS}", "train.lr=5e-3", "train.min_lr=5e-4", "train.warmup_steps=3",
        f"train.eval_interval={STEPS}", "train.eval_iters=2", f"data.cache_dir={root}/cache"])
    rt = build.build(cfg)  # the weights training starts from
    checkpoint.resume(rt)
    start = {k: v.detach().clone() for k, v in rt.model[0].module.state_dict().items() if k.endswith("word_embeddings.weight")}
    build.parallel_state.destroy_model_parallel()
    result = train(cfg, CPTStage())
    build.parallel_state.destroy_model_parallel()
    mcore_to_hf(f"{root}/cpt", f"{root}/hf_cpt")
    return result.history, start


def _hf_loss(path, texts):
    from transformers import AutoModelForCausalLM

    from data_prep.tokenizer import get_tokenizer

    tok = get_tokenizer("qwen3")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok.encode(text)[:SEQ]])
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_cpt_math_end_to_end(tmp_path, capsys):
    from tools.hf_io import HFCheckpoint

    history, start = run_on_ranks(_pipeline, 1, str(tmp_path))[0]
    assert len(history) == STEPS
    lrs = [h["lr"] for h in history]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[-1] < max(lrs)  # re-warmup from 0, then decay
    assert history[-1]["val_loss"] is not None and math.isfinite(history[-1]["val_loss"])
    # Training started from the converted HF weights, not a fresh init.
    hf_emb = HFCheckpoint(str(tmp_path / "hf_base")).get("model.embed_tokens.weight")
    assert torch.equal(next(iter(start.values())), hf_emb)
    math_heldout = _math_texts(3, seed=999)
    from megatron_ext.data import SAMPLE_CORPUS

    with gzip.open(SAMPLE_CORPUS, "rt") as f:
        general_heldout = [json.loads(line)["text"] for line in f][-8:]
    before = {"math": _hf_loss(tmp_path / "hf_base", math_heldout), "general": _hf_loss(tmp_path / "hf_base", general_heldout)}
    after = {"math": _hf_loss(tmp_path / "hf_cpt", math_heldout), "general": _hf_loss(tmp_path / "hf_cpt", general_heldout)}
    with capsys.disabled():
        print(f"\nCPT validation loss (transformers, held-out): math {before['math']:.3f} -> {after['math']:.3f}, "
              f"general {before['general']:.3f} -> {after['general']:.3f}; train loss {history[0]['loss']:.3f} -> "
              f"{history[-1]['loss']:.3f}; mixture val_loss {history[-1]['val_loss']:.3f}")
    assert after["math"] < before["math"] - 1.0
    assert math.isfinite(after["general"])


def test_converted_checkpoint_errors_name_the_problem(tmp_path):
    from types import SimpleNamespace

    from megatron_ext import checkpoint
    from megatron_ext.cli import load_config

    cfg = load_config(["model=qwen3_debug", f"checkpoint.load={tmp_path}"])
    saved = {**dataclasses.asdict(cfg.model), "name": "other", "num_layers": 2, "rope_theta": 1e4}
    (tmp_path / checkpoint.CONVERTED_META).write_text(json.dumps({"format_version": checkpoint.FORMAT_VERSION,
                                                                  "model": saved, "dtype": "float32"}))
    with pytest.raises(checkpoint.CheckpointError, match="weights_only=true"):
        checkpoint.resume(SimpleNamespace(config=cfg))
    with pytest.raises(checkpoint.CheckpointError, match=r"num_layers: checkpoint 2 vs job 4") as err:
        checkpoint.load_weights([], tmp_path, cfg.model)
    assert "rope_theta" not in str(err.value) and "name" not in str(err.value).split("qwen3_debug")[-1]
