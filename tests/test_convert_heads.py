"""Reward models through the converters, and the shape and head checks of weight loading.

A reward model (python -m posttrain.rm) leaves as transformers' `*ForSequenceClassification`
and scores the same tokens as our model to 1e-5 (fp32); a transformers SequenceClassification
model comes in as a reward model that scores like transformers; a PRM goes both ways as
`*ForTokenClassification` (num_labels=2: softmax P(correct) = sigmoid of our logit), a class
bias that differs between the labels included; Qwen2.5-Math-RM / PRM (Qwen2ForRewardModel /
Qwen2ForProcessRewardModel, an MLP value head) go both ways and score as their MLP head does.
Weight loading checks every tensor's shape first, starts a reward model from a language model
with a fresh value head, and refuses a reward model as a language model (the DPO reference).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, Qwen2Config,
                          Qwen2Model, Qwen3Config, Qwen3ForSequenceClassification, Qwen3ForTokenClassification)

from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import train_stage
from tests.test_convert import _COMMON, save_hf
from tools.convert import hf_to_mcore, mcore_to_hf
from tools.hf_io import HFCheckpointError

PAD = 0
ROWS = [[5, 17, 200, 3, 99, 42, 7, 8], [255, 1, 13, 128, 64], [9, 77, 31]]  # no PAD inside
RM = ["model=qwen3_debug", "data.seq_length=48", "train.micro_batch_size=4", "train.global_batch_size=4",
      "posttrain.num_samples=16", "train.init_method_std=0.2", "train.steps=1"]


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1 + noise if "norm" in name else noise)
    return model.eval()


def _padded(rows, pad):
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def _our_values(ckpt: str, stage: str):
    """Our model's value-head output at every position of ROWS, loaded as eval.<stage>_load does."""
    from megatron_ext.offline import layout_config
    from megatron_ext.checkpoint import open_checkpoint
    from posttrain.evals.runner import head_values, load_model

    src = open_checkpoint(ckpt)
    chunks, _ = load_model(ckpt, layout_config(src.model, src.dtype), value_stage=stage)
    return [v.tolist() for v in head_values(chunks, ROWS, PAD, batch_size=len(ROWS))]


def _convert_and_score(rank, world_size, hf_dir, ckpt, back, stage):
    hf_to_mcore(hf_dir, ckpt)
    values = _our_values(ckpt, stage)
    mcore_to_hf(ckpt, back)
    return values


def _hf_seqcls(path: Path) -> Path:
    config = Qwen3Config(**_COMMON, head_dim=32, num_labels=1, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(0)
    _randomize(Qwen3ForSequenceClassification(config)).save_pretrained(path)
    return path


def _tensors(path: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_hf_sequence_classification_imports_as_rm_and_scores_like_transformers(tmp_path):
    hf_dir = _hf_seqcls(tmp_path / "hf")
    values, = run_on_ranks(_convert_and_score, 1, str(hf_dir), str(tmp_path / "ckpt"), str(tmp_path / "back"), "rm")
    assert json.loads((tmp_path / "ckpt" / "qwen_checkpoint.json").read_text())["head"] == "rm"
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=_padded(ROWS, PAD)).logits.squeeze(-1)
    ours = torch.tensor([v[-1] for v in values])
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    # ... and back to HF bit-exact, as the same class with its labels and pad token.
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == ["Qwen3ForSequenceClassification"] and back["pad_token_id"] == PAD
    a, b = _tensors(hf_dir), _tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hf_tokcls(path: Path, bias) -> Path:
    config = Qwen3Config(**_COMMON, head_dim=32, num_labels=2, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = _randomize(Qwen3ForTokenClassification(config))
    with torch.no_grad():
        model.score.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path)
    return path


def _p_correct(path: Path) -> torch.Tensor:
    hf = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=_padded(ROWS, PAD)).logits.softmax(-1)[..., 1]


def test_prm_both_ways_as_token_classification(tmp_path):
    hf_dir = _hf_tokcls(tmp_path / "hf", [0.3, 0.3])  # an equal class bias cancels in the softmax
    values, = run_on_ranks(_convert_and_score, 1, str(hf_dir), str(tmp_path / "ckpt"), str(tmp_path / "back"),
                           "prm")
    want = _p_correct(hf_dir)
    for i, row in enumerate(values):
        torch.testing.assert_close(torch.sigmoid(torch.tensor(row)), want[i, :len(row)], rtol=0, atol=1e-5)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == ["Qwen3ForTokenClassification"] and len(back["id2label"]) == 2
    torch.testing.assert_close(_p_correct(tmp_path / "back"), want, rtol=0, atol=1e-5)


def test_prm_with_a_differing_class_bias_keeps_it_both_ways(tmp_path):
    """TRL PRM with score.bias [b0, b1], b0 != b1: one logit with bias b1 - b0, back as [0, b1 - b0]."""
    hf_dir = _hf_tokcls(tmp_path / "hf", [0.1, -0.2])
    values, = run_on_ranks(_convert_and_score, 1, str(hf_dir), str(tmp_path / "ckpt"), str(tmp_path / "back"),
                           "prm")
    meta = json.loads((tmp_path / "ckpt" / "qwen_checkpoint.json").read_text())
    assert meta["head"] == "prm" and meta["model"]["value_head_bias"] and meta["model"]["value_head"] == "linear"
    want = _p_correct(hf_dir)
    for i, row in enumerate(values):
        torch.testing.assert_close(torch.sigmoid(torch.tensor(row)), want[i, :len(row)], rtol=0, atol=1e-5)
    back = _tensors(tmp_path / "back")
    torch.testing.assert_close(back["score.bias"], torch.tensor([0.0, -0.3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(_p_correct(tmp_path / "back"), want, rtol=0, atol=1e-5)


def _hf_mlp_head(path: Path, arch: str, labels: int, lm_head: bool = False) -> Path:
    """A Qwen2.5-Math-RM / PRM directory: Qwen2Model weights under `model.`, the MLP head
    score.0 (Linear h -> h) + ReLU + score.2 (Linear h -> num_labels), both with biases (and,
    as Qwen2.5-Math-RM-72B, an unused `lm_head.weight`)."""
    config = Qwen2Config(**_COMMON, tie_word_embeddings=False)
    torch.manual_seed(0)
    body = _randomize(Qwen2Model(config))
    tensors = {f"model.{k}": v for k, v in body.state_dict().items()}
    gen, h = torch.Generator().manual_seed(1), config.hidden_size
    tensors.update({"score.0.weight": torch.randn(h, h, generator=gen) * 0.2,
                    "score.0.bias": torch.randn(h, generator=gen) * 0.2,
                    "score.2.weight": torch.randn(labels, h, generator=gen) * 0.2,
                    "score.2.bias": torch.randn(labels, generator=gen) * 0.2})
    if lm_head:
        tensors["lm_head.weight"] = torch.randn(config.vocab_size, h, generator=gen)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.update(architectures=[arch], num_labels=labels, pad_token_id=PAD)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _mlp_head_logits(path: Path):
    """Per row of ROWS (unpadded): transformers' Qwen2Model last hidden state -> score.0 -> ReLU
    -> score.2, in fp32: [len(row), num_labels]."""
    tensors = _tensors(path)
    config = Qwen2Config(**{k: v for k, v in json.loads((path / "config.json").read_text()).items()
                            if k not in ("architectures", "auto_map")})
    body = Qwen2Model(config)
    body.load_state_dict({k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")})
    body.eval()
    out = []
    with torch.no_grad():
        for row in ROWS:
            hidden = body(input_ids=torch.tensor([row])).last_hidden_state[0]
            mid = torch.relu(hidden @ tensors["score.0.weight"].float().T + tensors["score.0.bias"].float())
            out.append(mid @ tensors["score.2.weight"].float().T + tensors["score.2.bias"].float())
    return out


def test_qwen2_reward_model_mlp_head_both_ways(tmp_path):
    """Qwen2.5-Math-RM layout (Qwen2ForRewardModel): our RM scores each row's last token as the
    MLP head does, and goes back to the same tensors (but the unused lm_head) and class."""
    hf_dir = _hf_mlp_head(tmp_path / "hf", "Qwen2ForRewardModel", 1, lm_head=True)
    values, = run_on_ranks(_convert_and_score, 1, str(hf_dir), str(tmp_path / "ckpt"), str(tmp_path / "back"), "rm")
    meta = json.loads((tmp_path / "ckpt" / "qwen_checkpoint.json").read_text())
    assert meta["head"] == "rm" and meta["model"]["value_head"] == "mlp" and meta["model"]["value_head_bias"]
    want = torch.stack([logits[-1, 0] for logits in _mlp_head_logits(hf_dir)])
    ours = torch.tensor([v[-1] for v in values])
    assert len({round(x, 3) for x in want.tolist()}) > 1  # the rows really score differently
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == ["Qwen2ForRewardModel"] and back["num_labels"] == 1
    assert "value_head" not in back and "value_head_bias" not in back
    a, b = _tensors(hf_dir), _tensors(tmp_path / "back")
    del a["lm_head.weight"]  # not part of the reward model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen2_process_reward_model_mlp_head_both_ways(tmp_path):
    """Qwen2.5-Math-PRM layout (Qwen2ForProcessRewardModel, num_labels=2): sigmoid of our logit at
    every position is the MLP head's softmax P(correct); back as the same class, scoring the same."""
    hf_dir = _hf_mlp_head(tmp_path / "hf", "Qwen2ForProcessRewardModel", 2)
    values, = run_on_ranks(_convert_and_score, 1, str(hf_dir), str(tmp_path / "ckpt"), str(tmp_path / "back"),
                           "prm")
    meta = json.loads((tmp_path / "ckpt" / "qwen_checkpoint.json").read_text())
    assert meta["head"] == "prm" and meta["model"]["value_head"] == "mlp"
    want = [logits.softmax(-1)[:, 1] for logits in _mlp_head_logits(hf_dir)]
    for row, p in zip(values, want):
        torch.testing.assert_close(torch.sigmoid(torch.tensor(row)), p, rtol=0, atol=1e-5)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == ["Qwen2ForProcessRewardModel"] and back["num_labels"] == 2
    for got, p in zip(_mlp_head_logits(tmp_path / "back"), want):
        torch.testing.assert_close(got.softmax(-1)[:, 1], p, rtol=0, atol=1e-5)


def test_mlp_head_with_wrong_score_shape_is_refused(tmp_path):
    hf_dir = _hf_mlp_head(tmp_path / "hf", "Qwen2ForRewardModel", 2)  # a reward model has one label
    with pytest.raises(HFCheckpointError, match=r"score.2.weight .* has shape \[2, 64\], expected \[1, 64\]"):
        hf_to_mcore(str(hf_dir), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("change,match", [
    ({"value_head_bias": True}, "ForSequenceClassification score has no bias"),  # a reward model's bias
    ({"value_head": "mlp", "value_head_bias": True}, "value_head=mlp has no HF layout"),  # MLP head: Qwen2 only
])
def test_value_head_without_hf_layout_is_refused_by_mcore_to_hf(tmp_path, change, match):
    """mcore-to-hf refuses a Qwen3 reward model whose value head no HF class holds."""
    import dataclasses

    from megatron_ext.checkpoint import Source
    from models import registry
    from tools.convert import check_exportable

    m = registry.config_from_hf(Qwen3Config(**_COMMON, head_dim=32).to_dict())
    src = Source(tmp_path, dataclasses.replace(m, **change), torch.float32, head="rm")
    with pytest.raises(HFCheckpointError, match=match):
        check_exportable(src)
    check_exportable(Source(tmp_path, m, torch.float32, head="rm"))  # the default head has one


def _train_rm_then_export(rank, world_size, root, back):
    train_stage("rm", 1, RM + [f"checkpoint.dir={root}", "checkpoint.save_interval=1"])
    values = _our_values(root, "rm")
    mcore_to_hf(root, back)
    return values


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """A reward model trained one step by the RM stage (checkpoint root), its HF export, and our
    model's values at every position of ROWS."""
    tmp = tmp_path_factory.mktemp("rm")
    root, back = tmp / "run", tmp / "hf"
    values, = run_on_ranks(_train_rm_then_export, 1, str(root), str(back))
    return root, back, values


def test_trained_rm_exports_as_sequence_classification_scoring_like_ours(trained_rm):
    _, back, values = trained_rm
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"] and config["num_labels"] == 1
    assert "lm_head.weight" not in _tensors(back) and list(_tensors(back)["score.weight"].shape) == [1, 64]
    hf = AutoModelForSequenceClassification.from_pretrained(back, dtype=torch.float32).eval()
    pad = config["pad_token_id"]
    assert all(pad not in r for r in ROWS)
    with torch.no_grad():
        want = hf(input_ids=_padded(ROWS, pad)).logits.squeeze(-1)
    ours = torch.tensor([v[-1] for v in values])
    assert len({round(x, 3) for x in ours.tolist()}) > 1  # the rows really score differently
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- load_weights: shapes and heads


def _convert(rank, world_size, hf_dir, ckpt):
    hf_to_mcore(hf_dir, ckpt)


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    hf_dir = save_hf("qwen3", False, root / "hf")
    run_on_ranks(_convert, 1, str(hf_dir), str(root / "ckpt"))
    return root / "ckpt"


def _load_into(rank, world_size, ckpt, change, value_head):
    import dataclasses

    from megatron_ext import checkpoint, offline
    from posttrain.rm import add_value_head

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("megatron_ext.checkpoint").addHandler(handler)
    logging.getLogger("megatron_ext.checkpoint").setLevel(logging.INFO)
    src = checkpoint.open_checkpoint(ckpt)
    cfg = offline.layout_config(dataclasses.replace(src.model, **change), src.dtype)
    chunks = offline.build(cfg)
    if value_head:
        for chunk in chunks:
            add_value_head(chunk, cfg)
    head_before = chunks[0].output_layer.weight.detach().clone()
    try:
        checkpoint.load_weights(chunks, src)
    except checkpoint.CheckpointError as e:
        return "error", str(e)
    params = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    return "ok", (params, head_before, records)


def test_shape_mismatch_names_tensor_and_both_shapes(lm_ckpt):
    kind, msg = run_on_ranks(_load_into, 1, str(lm_ckpt), {"vocab_size": 512}, False)[0]
    assert kind == "error", msg
    assert "tensor embedding.word_embeddings.weight: checkpoint shape [256, 64], model shape [512, 64]" in msg
    assert "tensor output_layer.weight: checkpoint shape [256, 64], model shape [512, 64]" in msg


def test_rm_from_language_model_gets_a_fresh_logged_head(lm_ckpt):
    kind, got = run_on_ranks(_load_into, 1, str(lm_ckpt), {}, True)[0]
    assert kind == "ok", got
    params, head_before, records = got
    head = params["output_layer.weight"]
    assert list(head.shape) == [1, 64] and torch.equal(head, head_before)  # kept its fresh init
    hf_dir = lm_ckpt.parent / "hf"
    lm_head = _tensors(hf_dir)["lm_head.weight"]
    assert not any(torch.allclose(head[0], row) for row in lm_head)
    torch.testing.assert_close(params["embedding.word_embeddings.weight"],
                               _tensors(hf_dir)["model.embed_tokens.weight"], rtol=0, atol=0)
    assert any("language model (lm) checkpoint" in r and "freshly initialised" in r for r in records), records


def _dpo_reference(rank, world_size, ref):
    from megatron_ext.checkpoint import CheckpointError
    from posttrain.reference import Reference
    from tests.stage_fixture import stage_batch

    try:  # the DPO stage computes its reference log-probs while making its datasets
        cfg, _, _, _ = stage_batch("dpo", 1, ["model=qwen3_debug", "data.seq_length=48", "train.micro_batch_size=2",
                                              "train.global_batch_size=2", "posttrain.num_samples=8",
                                              f"posttrain.ref_load={ref}"])
        Reference(cfg).build()
    except CheckpointError as e:
        return str(e)
    return None


def test_dpo_reference_from_a_reward_model_is_refused(trained_rm):
    root, _, _ = trained_rm
    msg, = run_on_ranks(_dpo_reference, 1, str(root))
    assert msg is not None and "reward model (rm) checkpoint" in msg and "language model (lm)" in msg, msg
