"""Long context: YaRN logits equal transformers' with the same rope_scaling, and the HF export
writes rope_theta / rope_scaling back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.forked_ranks import run_on_ranks

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


def _training_runtime_logits(rank, world, ckpt, ids):
    from megatron_ext import checkpoint
    from megatron_ext.build import build
    from megatron_ext.cli import load_config
    from tools.logits import forward_logits

    cfg = load_config([f"checkpoint.load={ckpt}", "checkpoint.weights_only=true"])
    cfg.model = checkpoint.read_model_meta(ckpt)[0]
    rt = build(cfg)
    checkpoint.resume(rt)
    return forward_logits(rt.model, ids).numpy()


def test_training_build_applies_yarn_once(tmp_path):
    """The runtime every stage trains (megatron_ext.build) has YaRN exactly as transformers."""
    model = _yarn_hf(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(2))
    run_on_ranks(_convert_only, 1, str(tmp_path / "hf"), str(tmp_path / "mcore"))
    ours = run_on_ranks(_training_runtime_logits, 1, str(tmp_path / "mcore"), ids)[0]
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    assert np.abs(ours - reference).max() < 1e-4


def _convert_only(rank, world, hf, out):
    from tools.convert import hf_to_mcore

    hf_to_mcore(hf, out)


DOC_LENGTHS = [8, 12, 4, 8]  # multiples of 2*CP=4; 32 tokens in the pack


def test_thd_positions_cp2_equal_single_process():
    from megatron_ext.local_layers import thd_token_positions

    cu = torch.tensor([0, 8, 20, 24, 32])
    doc1, pos1, idx1 = thd_token_positions(cu, 0, 1)
    assert idx1.tolist() == list(range(32))
    assert pos1.tolist() == [p for n in DOC_LENGTHS for p in range(n)]  # positions restart per document
    parts = [thd_token_positions(cu, r, 2) for r in range(2)]
    index = torch.cat([p[2] for p in parts])
    assert sorted(index.tolist()) == list(range(32))  # the ranks cover the pack exactly once
    for k in (0, 1):  # document ids and positions of every token agree with the single-process ones
        assert torch.equal(torch.cat([p[k] for p in parts]), (doc1, pos1)[k][index])
    # Document-causal masks: the CP=2 rows (queries) / columns (gathered keys) are the CP=1 mask permuted.
    full = (doc1[None] == doc1[:, None]) & (pos1[None] <= pos1[:, None])
    for r, (d, p, i) in enumerate(parts):
        kd, kp = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        assert torch.equal((kd[None] == d[:, None]) & (kp[None] <= p[:, None]), full[i][:, index])
    with pytest.raises(ValueError, match="document 1 has length 6"):
        thd_token_positions(torch.tensor([0, 8, 14]), 0, 2)


def _pack():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (1, sum(DOC_LENGTHS)), generator=gen)
    cu = torch.tensor([0] + list(np.cumsum(DOC_LENGTHS)), dtype=torch.int32)
    labels = torch.roll(tokens, -1, dims=1)  # the last label of each document is not used
    positions = torch.cat([torch.arange(n) for n in DOC_LENGTHS]).unsqueeze(0)
    return tokens, labels, positions, cu


def _packed_losses(rank, world, cp):
    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.data import packed_on_this_rank, packed_seq_params
    from megatron_ext.local_layers import thd_token_positions
    from megatron_ext.transformer import transformer_config

    cfg = load_config(["model=qwen3_debug", "model.vocab_size=256", f"parallel.cp={cp}", "data.seq_length=32"])
    init_parallel(cfg)
    model = build_model(cfg, transformer_config(cfg))[0].eval()
    tokens, labels, positions, cu = _pack()
    batch = packed_on_this_rank({"tokens": tokens, "labels": labels, "position_ids": positions}, cu)
    with torch.no_grad():
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     packed_seq_params=packed_seq_params(cu))[0]
        separate = None
        if cp == 1:  # each document on its own, unpacked: the reference for document masking
            separate = torch.cat([model(tokens[:, a:b], torch.arange(b - a)[None], None, labels=labels[:, a:b])[0]
                                  for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    if cp > 1:
        from megatron.core import parallel_state

        parts = [torch.empty_like(loss) for _ in range(cp)]
        torch.distributed.all_gather(parts, loss.contiguous(), group=parallel_state.get_context_parallel_group())
        index = torch.cat([thd_token_positions(cu, r, cp)[2] for r in range(cp)])
        loss = torch.empty_like(torch.cat(parts)).index_copy_(0, index, torch.cat(parts))
    return loss, separate


def test_packed_documents_equal_separate_and_cp2():
    one, separate = run_on_ranks(_packed_losses, 1, 1)[0]
    two, _ = run_on_ranks(_packed_losses, 2, 2)[0]
    used = torch.ones(sum(DOC_LENGTHS), dtype=torch.bool)
    used[np.cumsum(DOC_LENGTHS) - 1] = False  # a document's last label crosses into the next one
    assert one.std() > 0
    torch.testing.assert_close(one[used], separate[used], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)


def test_pack_documents_masks_crossing_labels():
    from posttrain.cpt import pack_documents

    tokens = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 3]])
    batch = {"tokens": tokens, "labels": torch.tensor([[6, 0, 7, 8, 9, 0, 3, 4]]), "loss_mask": torch.ones(1, 8),
             "position_ids": torch.arange(8)[None]}
    packed, cu = pack_documents(batch, eod=0, multiple=4)
    assert cu.tolist() == [0, 4, 8, 12]
    assert packed["tokens"].tolist() == [[5, 6, 0, 0, 7, 8, 9, 0, 3, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3] * 3]
    # The EOD's label (next document's first token) and padding are not trained on.
    assert packed["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0]]


def _train_losses(rank, world, cp, root, masked):
    from megatron_ext.cli import load_config
    from megatron_ext.loop import train
    from posttrain.cpt import CPTStage

    cfg = load_config(["stage=long_context", "model=qwen3_debug", "data.paths=[]", f"parallel.cp={cp}",
                       "data.seq_length=128", f"cpt.document_mask={str(masked).lower()}", "train.steps=2",
                       "train.micro_batch_size=2", "train.global_batch_size=2", "train.warmup_steps=1",
                       "train.lr=1e-3", "train.min_lr=1e-4", "train.eval_interval=0", "checkpoint.weights_only=false",
                       f"data.cache_dir={root}/cache"])
    return [h["loss"] for h in train(cfg, CPTStage()).history]


@pytest.mark.slow
def test_document_masked_training_cp2_equals_cp1(tmp_path):
    one = run_on_ranks(_train_losses, 1, 1, str(tmp_path), True)[0]
    two = run_on_ranks(_train_losses, 2, 2, str(tmp_path), True)[0]
    unmasked = run_on_ranks(_train_losses, 1, 1, str(tmp_path), False)[0]
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert abs(unmasked[0] - one[0]) > 1e-4  # the samples do contain several documents
