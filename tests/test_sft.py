"""SFT: the loss mask covers assistant tokens only, and the stage's loss equals a direct
PyTorch cross entropy on the same batch at TP=1 and TP=2."""

import math

import torch

from tests.gloo import run_on_ranks

SFT = ["model=qwen3_debug", "data.seq_length=96", "train.micro_batch_size=2", "train.global_batch_size=2"]


def test_loss_mask_excludes_every_non_assistant_token():
    from data_prep.tokenizer import get_tokenizer
    from posttrain.sft import sft_sample

    tok = get_tokenizer("qwen3")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course."}]
    from data_prep.chat import encode_chat

    ids, mask = encode_chat(tok, msgs)
    s = sft_sample(ids, mask, 96, tok.pad, "conversation")
    targets = [int(t) for t, m in zip(s["labels"], s["loss_mask"]) if m]
    # The learned targets are exactly the two replies, each followed by <|im_end|>.
    im_end = tok.token_to_id("<|im_end|>")
    assert targets == tok.encode("4") + [im_end] + tok.encode("6, of course.") + [im_end]
    # Every other label (system, user, headers, newlines, padding) has mask 0.
    n_real = len(ids) - 1
    assert int(s["loss_mask"].sum()) == len(targets)
    assert s["loss_mask"][n_real:].sum() == 0 and s["tokens"].shape == (96,)
    # tokens[i] predicts labels[i] == ids[i + 1].
    assert s["labels"][:n_real].tolist() == ids[1:] and s["tokens"][:n_real].tolist() == ids[:-1]


def _sft_batch_loss(rank, world_size, overrides):
    from megatron_ext import data
    from megatron_ext.build import build
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from posttrain.sft import SFTStage

    cfg = load_config(["stage=sft", *overrides])
    validate(cfg, world_size)
    stage = SFTStage(cfg)
    rt = build(cfg)
    train_ds, _ = stage.datasets(cfg, 2, 0)
    batch = next(data.loader(train_ds, cfg))
    out, loss_func = stage.forward_step(iter([batch]), rt.model[0])
    loss_sum, n, rep = loss_func(out)
    hand = None
    if world_size == 1:
        with torch.no_grad():
            logits = rt.model[0](batch["tokens"], batch["position_ids"], attention_mask=None)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        hand = (ce * batch["loss_mask"].flatten()).sum().item(), batch["loss_mask"].sum().item()
    return loss_sum.item(), int(n), rep["lm loss"].tolist(), hand


def test_sft_loss_matches_torch_at_tp1_and_tp2():
    (loss, n, rep, hand), = run_on_ranks(_sft_batch_loss, 1, SFT)
    assert n == hand[1] > 10
    assert math.isclose(loss, hand[0], rel_tol=1e-5), (loss, hand)
    assert rep == [loss, n]
    for got, n2, _, _ in run_on_ranks(_sft_batch_loss, 2, SFT + ["parallel.tp=2"]):
        assert n2 == n and math.isclose(got, hand[0], rel_tol=1e-5), (got, hand)
