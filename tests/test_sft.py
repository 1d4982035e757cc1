"""SFT: the loss mask covers assistant tokens only, and the stage's loss equals a direct
PyTorch cross entropy on the same batch at TP=1 and TP=2. Packed SFT (`sft.packing`):
a micro-batch's loss equals the sum of its conversations' unpacked losses (document masking,
positions restarting per conversation) at TP=1, TP=2 and CP=2 (slow), and the mask stays
assistant-only."""

import math

import pytest
import torch

from megatron_ext.stages import LOSS
from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import stage_batch

SFT = ["model=qwen3_debug", "data.seq_length=96", "train.micro_batch_size=2", "train.global_batch_size=2"]
# The sample's first 6 conversations (40-73 tokens) fill 3 packs of 128 tokens, 2 per pack.
PACKED = ["model=qwen3_debug", "data.seq_length=128", "train.micro_batch_size=3", "train.global_batch_size=3",
          "sft.packing=true"]
N_ROWS = 6
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course."}]


def test_loss_mask_excludes_every_non_assistant_token():
    from data_prep.tokenizer import get_tokenizer
    from posttrain.sft import sft_sample

    tok = get_tokenizer("qwen3")
    from data_prep.chat import encode_chat

    ids, mask = encode_chat(tok, MESSAGES)
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
    cfg, stage, model, batch = stage_batch("sft", world_size, overrides, samples=2)
    out, loss_func = stage.forward_step(iter([batch]), model)
    loss_sum, n, rep = loss_func(out)
    hand = None
    if world_size == 1:
        with torch.no_grad():
            logits = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        hand = (ce * batch["loss_mask"].flatten()).sum().item(), batch["loss_mask"].sum().item()
    return loss_sum.item(), int(n), rep[LOSS].tolist(), hand


def test_sft_loss_matches_torch_at_tp1_and_tp2():
    (loss, n, rep, hand), = run_on_ranks(_sft_batch_loss, 1, SFT)
    assert n == hand[1] > 10
    assert math.isclose(loss, hand[0], rel_tol=1e-5), (loss, hand)
    assert rep == [loss, n]
    for got, n2, _, _ in run_on_ranks(_sft_batch_loss, 2, SFT + ["parallel.tp=2"]):
        assert n2 == n and math.isclose(got, hand[0], rel_tol=1e-5), (got, hand)


def test_packed_loss_mask_excludes_every_non_assistant_token():
    from data_prep.chat import encode_chat
    from data_prep.tokenizer import get_tokenizer
    from posttrain.sft import encode_rows

    tok = get_tokenizer("qwen3")
    im_end = tok.token_to_id("<|im_end|>")
    other = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    rows = [{"messages": MESSAGES}, {"messages": other}]
    replies = {0: tok.encode("4") + [im_end] + tok.encode("6, of course.") + [im_end],
               1: tok.encode("Paris.") + [im_end]}
    encoded = [encode_chat(tok, r["messages"])[0] for r in rows]
    (s,) = encode_rows(rows, tok, 96, "chats", pack_multiple=4)  # CP=2: documents padded to 4
    cu = s["cu_seqlens"].tolist()
    order = sorted(range(2), key=lambda i: -len(encoded[i]))  # longest first
    assert len(cu) == 4 and cu[-1] == 96 and all((b - a) % 4 == 0 for a, b in zip(cu, cu[1:]))
    targets = [int(t) for t, m in zip(s["labels"], s["loss_mask"]) if m]
    assert targets == replies[order[0]] + replies[order[1]]
    assert int(s["loss_mask"].sum()) == len(targets)
    for doc, (a, b) in zip(order, zip(cu, cu[1:])):
        ids, n = encoded[doc], len(encoded[doc]) - 1
        # Shifted within the conversation: no label is the next conversation's first token.
        assert s["tokens"][a:a + n].tolist() == ids[:-1] and s["labels"][a:a + n].tolist() == ids[1:]
        assert s["loss_mask"][a + n:b].sum() == 0 and s["position_ids"][a:b].tolist() == list(range(b - a))
    assert s["loss_mask"][cu[2]:].sum() == 0 and s["tokens"][cu[2]:].eq(tok.pad).all()


def test_packed_conversation_longer_than_seq_length_names_the_row():
    from data_prep.tokenizer import get_tokenizer
    from posttrain.sft import encode_rows

    tok = get_tokenizer("qwen3")
    rows = [{"messages": MESSAGES[:3]}, {"messages": MESSAGES}]
    with pytest.raises(ValueError, match=r"chats.jsonl row 1 has \d+ tokens .*> data.seq_length=32"):
        encode_rows(rows, tok, 32, "chats.jsonl", pack_multiple=2)
    assert len(encode_rows(rows[:1], tok, 32, "chats.jsonl", pack_multiple=2)) == 1


def test_packing_with_pipeline_parallelism_is_rejected():
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError
    from posttrain.sft import SFTStage

    with pytest.raises(ConfigError, match=r"sft.packing=true needs parallel.pp=1 \(got 2\)"):
        SFTStage(load_config(["stage=sft", "sft.packing=true", "parallel.pp=2"]))


def _packed_and_unpacked(rank, world_size, overrides):
    """Loss sum and token count of one packed micro-batch of the sample's first conversations
    (summed over CP ranks), and at world size 1 the same conversations unpacked and, as a
    control, the packed tokens run without document masking."""
    import dataclasses

    from megatron.core import parallel_state

    from data_prep.tokenizer import get_tokenizer
    from megatron_ext import data
    from megatron_ext.build import build
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from posttrain.datasets import read_jsonl
    from posttrain.sft import SAMPLE, SFTStage, encode_rows

    cfg = load_config(["stage=sft", *PACKED, *overrides])
    validate(cfg, world_size)
    stage, rt = SFTStage(cfg), build(cfg)
    model, tok, rows = rt.model[0], get_tokenizer(cfg.data.tokenizer), read_jsonl(SAMPLE)[:N_ROWS]
    packs = encode_rows(rows, tok, cfg.data.seq_length, "sample", 2 * cfg.parallel.cp)
    assert len(packs) == cfg.train.micro_batch_size < N_ROWS
    batch = next(data.loader(packs, cfg))
    with torch.no_grad():
        packed_out, loss_func = stage.forward_step(iter([batch]), model)
        loss_sum, n, _ = loss_func(packed_out)
    total = torch.stack([loss_sum.detach(), n.float()])
    torch.distributed.all_reduce(total, group=parallel_state.get_context_parallel_group())
    if world_size > 1:
        return total.tolist(), None, None
    plain = SFTStage(dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, packing=False)))
    unpacked = torch.utils.data.default_collate(encode_rows(rows, tok, cfg.data.seq_length, "sample"))
    with torch.no_grad():
        out, loss_func = plain.forward_step(iter([unpacked]), model)
        ref_sum, ref_n, _ = loss_func(out)
        flat = {k: v.reshape(1, -1) for k, v in batch.items() if k != "cu_seqlens"}
        crossing = model(flat["tokens"], torch.arange(flat["tokens"].shape[1])[None], None, labels=flat["labels"])
    # Largest per-token loss change on the learned tokens when attention crosses conversations.
    crossing = ((crossing - packed_out).abs().reshape(-1) * flat["loss_mask"].reshape(-1)).max().item()
    return total.tolist(), [ref_sum.item(), float(ref_n)], crossing


def _check_packed_equals_unpacked(layouts):
    (packed, unpacked, crossing), = run_on_ranks(_packed_and_unpacked, 1, [])
    assert packed[1] == unpacked[1] > 50
    assert math.isclose(packed[0], unpacked[0], rel_tol=1e-5), (packed, unpacked)
    # Without document masking the same packed tokens give other losses: the check can fail.
    assert crossing > 1e-2, crossing
    for extra in layouts:
        for got, _, _ in run_on_ranks(_packed_and_unpacked, 2, extra):
            assert got[1] == unpacked[1] and math.isclose(got[0], unpacked[0], rel_tol=1e-5), (extra, got, unpacked)


def test_packed_loss_equals_sum_of_unpacked_conversations_at_tp1_and_tp2():
    _check_packed_equals_unpacked([["parallel.tp=2"]])


@pytest.mark.slow
def test_packed_loss_equals_sum_of_unpacked_conversations_at_cp2():
    _check_packed_equals_unpacked([["parallel.cp=2"]])
