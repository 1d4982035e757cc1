"""Exporting a training checkpoint (megatron_ext.checkpoint) to HF, checked against transformers."""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.forked_ranks import run_on_ranks
from tests.test_convert import TOKENS, TOL, hf_logits


def _train_and_export(rank, world_size, root):
    from megatron_ext import build, checkpoint
    from megatron_ext.cli import load_config
    from tools.convert import mcore_to_hf
    from tools.logits import dump_logits

    # The full Qwen vocabulary, so the job's tokenizer (data.tokenizer=qwen3) fits and is exported.
    cfg = load_config(["model=qwen2_moe_debug", "data.tokenizer=qwen3", f"checkpoint.dir={root}/train"])
    rt = build.build(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every weight off its init value (norms at 1, biases at 0 would hide a drop)
        for p in rt.model[0].module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    saved = checkpoint.save(rt, checkpoint.TrainState(step=1))
    build.parallel_state.destroy_model_parallel()
    mcore_to_hf(f"{root}/train", f"{root}/hf")  # the checkpoint root: its `latest` is used
    dump_logits(str(saved), TOKENS, f"{root}/ours.npy", all_positions=True)


def test_training_checkpoint_exports_to_transformers(tmp_path):
    run_on_ranks(_train_and_export, 1, str(tmp_path))
    reference = hf_logits(tmp_path / "hf")
    assert reference.std() > 0.1
    assert np.abs(np.load(tmp_path / "ours.npy") - reference).max() < TOL
    # The job's tokenizer travels with the weights and agrees with the one training used.
    from data_prep.tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    text = "def f(x):\n    return x ** 2  # 平方"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == get_tokenizer("qwen3").encode(text)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 151643
