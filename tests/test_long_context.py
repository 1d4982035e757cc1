"""Long context: YaRN logits equal transformers' with the same rope_scaling, and the HF export
writes rope_theta / rope_scaling back."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.gloo import run_on_ranks

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0}
SEQ = 48  # three times the original context: every RoPE frequency band is exercised


def _yarn_hf(path, theta=10000.0):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                      rope_parameters={"rope_theta": theta, **YARN})
    model = Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1 + noise if "norm" in name else noise)
    model.save_pretrained(path)
    return model


def _convert_logits_export(rank, world, hf, root, tokens):
    from tools.convert import hf_to_mcore, mcore_to_hf
    from tools.logits import dump_logits

    hf_to_mcore(hf, f"{root}/mcore")
    dump_logits(f"{root}/mcore", tokens, f"{root}/ours.npy", all_positions=True)
    mcore_to_hf(f"{root}/mcore", f"{root}/back")


def test_yarn_logits_equal_transformers(tmp_path):
    model = _yarn_hf(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    tokens = ";".join(",".join(map(str, row.tolist())) for row in ids)
    run_on_ranks(_convert_logits_export, 1, str(tmp_path / "hf"), str(tmp_path), tokens)
    with torch.no_grad():
        reference = model(ids).logits.numpy()
        plain = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0})
        without_yarn = plain.eval()(ids).logits.numpy()
    ours = np.load(tmp_path / "ours.npy")
    assert np.abs(without_yarn - reference).max() > 1e-2  # YaRN visibly changes the logits
    assert np.abs(ours - reference).max() < 1e-4
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    rope = exported.get("rope_parameters") or {**exported.get("rope_scaling", {}), "rope_theta": exported.get("rope_theta")}
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == 16
    assert rope["rope_theta"] == 10000.0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert np.abs(back(ids).logits.numpy() - reference).max() < 1e-5
