"""SFT formatting: assistant-only loss masks, packing with cu_seqlens, preference pairs."""

import numpy as np
import pytest

from data_prep.chat import encode_chat, format_preference, pack_sequences
from data_prep.tokenizer import get_tokenizer

TOK = get_tokenizer("qwen3")
IM_END = "<|im_end|>"


def masked_runs(ids, mask):
    """Decoded text of each maximal run of loss-masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    if cur:
        runs.append(TOK.decode(cur))
    return runs


def test_loss_only_on_assistant_turns():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid, of course."}]
    ids, mask = encode_chat(TOK, conv)
    assert TOK.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}\n" for m in conv)
    assert masked_runs(ids, mask) == ["Paris." + IM_END, "Madrid, of course." + IM_END]
    assert set(mask) == {0, 1}


def test_mask_never_covers_header_bytes_when_bpe_merges_across():
    # "assistant\n" + "\n\nHi": the newlines merge into one token that straddles the header.
    ids, mask = encode_chat(TOK, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nHi there"}])
    (run,) = masked_runs(ids, mask)
    assert run.endswith("Hi there" + IM_END) and "assistant" not in run
    assert ("\n\nHi there" + IM_END).endswith(run)


def test_generation_prompt_and_bad_messages():
    ids, mask = encode_chat(TOK, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert TOK.decode(ids).endswith("<|im_start|>assistant\n") and not any(mask)
    with pytest.raises(ValueError, match="message 1: unknown role 'bot'"):
        encode_chat(TOK, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match="message 0: content must be a string"):
        encode_chat(TOK, [{"role": "user", "content": None}])


def test_preference_pair_shares_prompt_and_masks_responses():
    pair = format_preference(TOK, [{"role": "system", "content": "Solve."}, {"role": "user", "content": "7*6?"}],
                             chosen="42", rejected="It is 36.")
    n = len(pair.prompt_ids)
    assert pair.chosen_ids[:n] == pair.prompt_ids == pair.rejected_ids[:n]
    assert not any(pair.chosen_mask[:n]) and not any(pair.rejected_mask[:n])
    assert masked_runs(pair.chosen_ids, pair.chosen_mask) == ["42" + IM_END]
    assert masked_runs(pair.rejected_ids, pair.rejected_mask) == ["It is 36." + IM_END]
    full, _ = encode_chat(TOK, [{"role": "system", "content": "Solve."}, {"role": "user", "content": "7*6?"},
                                {"role": "assistant", "content": "42"}])
    assert pair.chosen_ids == full
    with pytest.raises(ValueError, match="rejected response"):
        format_preference(TOK, "q", chosen="fine", rejected="\n\nstarts with newlines")


def _samples(rng, n, max_len):
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_len))
        out.append((rng.integers(0, 1000, k).tolist(), rng.integers(0, 2, k).tolist()))
    return out


def test_packing_preserves_every_sample_with_boundaries():
    rng = np.random.default_rng(0)
    samples = _samples(rng, 200, 300)
    seq = 512
    packs = pack_sequences(samples, seq, pad_id=151643)
    total = sum(len(s[0]) for s in samples)
    assert len(packs) >= -(-total // seq)
    assert len(packs) <= -(-total // seq) + 3  # first-fit decreasing stays close to the bound
    seen = []
    for p in packs:
        assert p.tokens.shape == p.loss_mask.shape == (seq,)
        assert p.cu_seqlens[0] == 0 and p.cu_seqlens[-1] == seq and np.all(np.diff(p.cu_seqlens) > 0)
        for j, doc in enumerate(p.doc_ids):
            a, b = p.cu_seqlens[j], p.cu_seqlens[j + 1]
            assert p.tokens[a:b].tolist() == samples[doc][0]
            assert p.loss_mask[a:b].tolist() == samples[doc][1]
        used = p.cu_seqlens[len(p.doc_ids)]
        assert np.all(p.tokens[used:] == 151643) and not p.loss_mask[used:].any()
        seen += p.doc_ids
    assert sorted(seen) == list(range(len(samples)))


def test_packing_overflow_policies():
    samples = [([1] * 10, [1] * 10), ([2] * 3, [0] * 3)]
    (p,) = pack_sequences(samples, 8, pad_id=0, overflow="drop")
    assert p.doc_ids == [1] and p.cu_seqlens.tolist() == [0, 3, 8]
    packs = pack_sequences(samples, 8, pad_id=0, overflow="truncate")
    assert [q.doc_ids for q in packs] == [[0], [1]] and packs[0].tokens.tolist() == [1] * 8
    assert packs[0].cu_seqlens.tolist() == [0, 8]
    with pytest.raises(ValueError, match="sample 0 has 10 tokens > seq_length 8"):
        pack_sequences(samples, 8, pad_id=0, overflow="error")
    with pytest.raises(ValueError, match="sample 0: 2 ids but 1 mask"):
        pack_sequences([([1, 2], [1])], 8, pad_id=0)
