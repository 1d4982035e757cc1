"""HF <-> Megatron conversion for every Qwen family against transformers' own models (fp32, CPU).

Each family: a tiny random HF model is built with transformers and saved; it is converted to a
Megatron checkpoint and back (every tensor must be bit-identical, tied and untied), the
written HF directory must load in transformers, and the Megatron model's logits must equal
transformers' within 1e-4. Bad inputs must fail with a message naming the file or tensor.
Parallel layouts (TP=2, PP=2, EP=2) are in test_convert_parallel.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from tests.forked_ranks import run_on_ranks
from tools.convert import hf_to_mcore, main as convert_main, mcore_to_hf
from tools.hf_io import HFCheckpointError
from tools.logits import dump_logits

REPO = Path(__file__).resolve().parent.parent
TOKENS = "5,17,200,3,99,42,7,8;255,0,13,128,64,1,77,9"  # even length: sequence parallel splits it
TOL = 1e-4
_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6)
_MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
# family -> (config class, model class, extra config): every family-specific feature switched on.
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),  # decoupled: 64 / 4 = 16
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                  dict(_MOE, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(_MOE, head_dim=32, norm_topk_prob=True)),
}


def make_hf_model(family: str, tied: bool, seed: int = 0, **config):
    """A tiny transformers model of `family` with every weight random (norms and biases too);
    `config` changes its config (e.g. num_hidden_layers)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**_COMMON, **extra, **config}, tie_word_embeddings=tied)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1 and biases at 0, which would hide a dropped tensor.
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1 + noise if "norm" in name else noise)
    return model


def save_hf(family: str, tied: bool, path: Path, max_shard_size: str = "200KB") -> Path:
    make_hf_model(family, tied).save_pretrained(path, max_shard_size=max_shard_size)
    return path


def token_batch() -> torch.Tensor:
    return torch.tensor([[int(t) for t in row.split(",")] for row in TOKENS.split(";")])


def hf_logits(path: Path) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(token_batch()).logits.numpy()


def read_tensors(path: Path) -> dict:
    """Every tensor of an HF directory, by name."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(path / file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _round_trip_worker(rank, world_size, cases):
    """Per family, per (hf_dir, ckpt, back, logits): HF -> Megatron (TP=1) -> HF, and Megatron
    logits. All families share one rank (starting it costs more than the work); a family's
    failure is returned, not raised, so the others still run."""
    errors = {}
    for family, family_cases in cases.items():
        try:
            for hf_dir, ckpt, back, logits in family_cases:
                hf_to_mcore(hf_dir, ckpt)
                mcore_to_hf(ckpt, back, max_shard_size="100KB")
                dump_logits(ckpt, TOKENS, logits, all_positions=True)
        except Exception:
            errors[family] = traceback.format_exc()
    return errors


@pytest.fixture(scope="module")
def all_converted(tmp_path_factory):
    """Per family: tied and untied HF dirs converted to Megatron and back, plus Megatron logits."""
    cases = {}
    for family in sorted(FAMILIES):
        root = tmp_path_factory.mktemp(family)
        for tied in (False, True):
            tag = "tied" if tied else "untied"
            hf_dir = save_hf(family, tied, root / f"hf_{tag}")
            cases.setdefault(family, {})[tag] = tuple(root / n for n in (hf_dir.name, f"ckpt_{tag}", f"back_{tag}",
                                                                         f"logits_{tag}.npy"))
    as_str = {f: [tuple(map(str, c)) for c in fc.values()] for f, fc in cases.items()}
    return cases, run_on_ranks(_round_trip_worker, 1, as_str)[0]


@pytest.fixture(params=sorted(FAMILIES))
def converted(request, all_converted):
    cases, errors = all_converted
    assert request.param not in errors, f"{request.param} failed on the rank:\n{errors[request.param]}"
    return request.param, cases[request.param]


@pytest.mark.parametrize("tag", ["untied", "tied"])
def test_round_trip_bit_exact(converted, tag):
    family, cases = converted
    hf_dir, _, back, _ = cases[tag]
    before, after = read_tensors(hf_dir), read_tensors(back)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert ("lm_head.weight" in after) == (tag == "untied")
    assert len(set(json.loads((back / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1


@pytest.mark.parametrize("tag", ["untied", "tied"])
def test_logits_match_transformers(converted, tag):
    family, cases = converted
    hf_dir, _, back, logits = cases[tag]
    reference = hf_logits(hf_dir)
    assert reference.std() > 0.1  # random weights give logits far from zero, so 1e-4 is a real bound
    ours = np.load(logits)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < TOL
    # The directory we wrote loads in transformers with its config and gives the same logits.
    # Not bit-equal for MoE: transformers' fused expert kernels round differently depending on
    # the shard layout it loaded from (the tensors themselves are bit-equal, see above).
    assert np.abs(hf_logits(back) - reference).max() < 1e-5


def test_config_json_round_trip(converted):
    family, cases = converted
    hf_dir, ckpt, back, _ = cases["untied"]
    before, after = json.loads((hf_dir / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key, value in before.items():
        if key != "transformers_version":
            assert after.get(key) == value, key
    assert (ckpt / "qwen_checkpoint.json").is_file()


# ---- bad inputs: each fails before any distributed work, naming the file or tensor ----

@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return save_hf("qwen3", False, tmp_path_factory.mktemp("bad") / "hf", max_shard_size="100KB")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_shard(hf_dir: Path, holder: str, edit) -> str:
    """Apply edit(tensors) to the shard holding tensor `holder`; returns that shard's name."""
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    file = index["weight_map"][holder]
    tensors = {}
    with safe_open(str(hf_dir / file), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, str(hf_dir / file), metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file or n in tensors}
    index["weight_map"].update({n: file for n in tensors})
    index_path.write_text(json.dumps(index))
    return file


def test_missing_shard_names_file(qwen3_dir, tmp_path, capsys):
    bad = _copy(qwen3_dir, tmp_path / "hf")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert convert_main(["hf-to-mcore", "--hf-dir", str(bad), "--out", str(tmp_path / "ckpt")]) == 2
    assert f"missing shard {shard}" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_extra_tensor_names_tensor_and_file(qwen3_dir, tmp_path):
    bad = _copy(qwen3_dir, tmp_path / "hf")
    file = _rewrite_shard(bad, "model.layers.0.self_attn.q_proj.weight",
                          lambda t: t.update({"model.layers.0.mlp.surprise.weight": torch.zeros(2, 2)}))
    with pytest.raises(HFCheckpointError, match=rf"model\.layers\.0\.mlp\.surprise\.weight in .*{file}"):
        hf_to_mcore(str(bad), str(tmp_path / "ckpt"))


def test_missing_tensor_named(qwen3_dir, tmp_path):
    bad = _copy(qwen3_dir, tmp_path / "hf")
    name = "model.layers.0.self_attn.k_norm.weight"
    _rewrite_shard(bad, name, lambda t: t.pop(name))
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.0\.self_attn\.k_norm\.weight is missing"):
        hf_to_mcore(str(bad), str(tmp_path / "ckpt"))


def test_unknown_model_type_named(qwen3_dir, tmp_path, capsys):
    bad = _copy(qwen3_dir, tmp_path / "hf")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert convert_main(["hf-to-mcore", "--hf-dir", str(bad), "--out", str(tmp_path / "ckpt")]) == 2
    assert "unknown model_type 'llama'" in capsys.readouterr().err


def test_existing_output_refused(qwen3_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_mcore(str(qwen3_dir), str(tmp_path / "ckpt"))


def test_shape_mismatch_names_tensor_cli(qwen3_dir, tmp_path):
    """Through the real entry point: a wrong-shaped tensor fails, names tensor and file, writes nothing."""
    bad = _copy(qwen3_dir, tmp_path / "hf")
    name = "model.layers.0.self_attn.q_proj.weight"
    file = _rewrite_shard(bad, name, lambda t: t.update({name: t[name][:-8].contiguous()}))
    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tools.convert", "hf-to-mcore", "--hf-dir", str(bad),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"HF tensor {name} in {bad / file} has shape [120, 64], expected [128, 64]" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".ckpt.tmp-*"))


def test_every_flag_has_help(capsys):
    """`--help` of each direction explains every flag (none is listed bare)."""
    import argparse

    from tools.convert import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert flags, name
        for action in flags:
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings[0]} has no help text"
        with pytest.raises(SystemExit) as exit_:
            convert_main([name, "--help"])
        assert exit_.value.code == 0
        out = " ".join(capsys.readouterr().out.split())  # help text rewrapped to one line
        for action in flags:
            assert action.option_strings[0] in out and " ".join(action.help.split()[:3]) in out, action.dest
