"""SFT: next-token loss on the assistant replies of chat conversations.

`python -m posttrain.sft [k=v ...]` trains on `posttrain.data_path` (jsonl rows with
"messages") or the bundled sample. Conversations are rendered with the model's own chat
template when data.tokenizer carries one, else plain ChatML (`posttrain.chat_template`). The
loss mask (from `data_prep.chat.encode_chat`) covers each assistant reply and its closing
`<|im_end|>` only (not the newline after it), shifted to the label positions. Loss is
summed per token and normalised by the global count of assistant tokens (reported as the
per-token loss).

- Default: each sample is one conversation right-padded to data.seq_length.
- `sft.packing=true`: conversations are packed first-fit (longest first) into
  samples of data.seq_length tokens. Each conversation is shifted on its own (no label crosses
  into the next one), padded to a multiple of 2*CP, and the tail padding forms a last segment;
  a sample records its boundaries (`cu_seqlens`, padded to a common length by repeating the
  end). forward_step joins a micro-batch's samples into one thd sequence (batch 1) and passes
  `packed_seq_params`, so attention is document-causal and RoPE positions restart per
  conversation: the loss equals the sum of the conversations' unpacked losses. Works with
  TP and CP; needs parallel.pp=1 (as `cpt.document_mask`). The packs are fixed once per run
  and walked in a fresh order each epoch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch

from data_prep.chat import encode_chat, pack_sequences
from megatron_ext import data
from megatron_ext.config import Config, ConfigError
from megatron_ext.pretrain import masked_token_loss
from megatron_ext.stages import Stage
from posttrain.datasets import DATA_DIR, Cycled, chat_tokenizer, pad_to, read_jsonl

SAMPLE = DATA_DIR / "sft_sample.jsonl"
PACKED_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def sft_sample(ids: Sequence[int], mask: Sequence[int], seq_length: int, pad: int, what: str) -> dict:
    """Shift (ids, mask) for next-token prediction and pad: tokens[i] predicts labels[i]."""
    tokens = pad_to(ids[:-1], seq_length, pad, what)
    labels = pad_to(ids[1:], seq_length, pad, what)
    loss_mask = pad_to(mask[1:], seq_length, 0, what)
    return {"tokens": torch.tensor(tokens), "labels": torch.tensor(labels),
            "loss_mask": torch.tensor(loss_mask, dtype=torch.float32),
            "position_ids": torch.arange(seq_length)}


def pack_conversations(encoded: Sequence[Tuple[List[int], List[int], str]], seq_length: int, pad: int,
                       multiple: int = 1) -> List[dict]:
    """Encoded conversations `(ids, mask, what)` -> packed SFT samples of `seq_length` tokens.

    Each conversation is shifted as in `sft_sample` and padded to a multiple of `multiple`
    (2*CP); `data_prep.chat.pack_sequences` places them (first-fit decreasing, never split).
    A conversation that cannot fit is an error naming it (`what`).
    """
    docs = []
    for ids, mask, what in encoded:
        n = len(ids) - 1
        length = n + (-n % multiple)
        if length > seq_length:
            padded = f" ({length} padded to a multiple of 2*parallel.cp={multiple})" if length != n else ""
            raise ValueError(f"{what} has {n} tokens{padded} > data.seq_length={seq_length}; "
                             "raise data.seq_length")
        docs.append((pad_to(ids[:-1], length, pad, what), pad_to(ids[1:], length, pad, what),
                     pad_to(mask[1:], length, 0, what)))
    packs = pack_sequences([(tokens, mask) for tokens, _, mask in docs], seq_length, pad, overflow="error")
    n_bounds = max(len(p.cu_seqlens) for p in packs)
    out = []
    for p in packs:
        labels = pad_to([t for i in p.doc_ids for t in docs[i][1]], seq_length, pad, "pack")
        bounds = p.cu_seqlens.tolist()
        out.append({
            "tokens": torch.as_tensor(p.tokens, dtype=torch.long),
            "labels": torch.tensor(labels),
            "loss_mask": torch.as_tensor(p.loss_mask, dtype=torch.float32),
            "position_ids": torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]),
            # A common length so the default collate can stack samples; repeats are dropped later.
            "cu_seqlens": torch.tensor(bounds + [bounds[-1]] * (n_bounds - len(bounds)), dtype=torch.int32),
        })
    return out


def join_packed(batch: dict) -> Tuple[dict, torch.Tensor]:
    """A collated micro-batch of packed samples ([b, s] + cu_seqlens [b, k]) -> one [1, b*s]
    thd sequence and its document boundaries (the thd layout has batch dimension 1)."""
    b, s = batch["tokens"].shape
    bounds = [torch.zeros(1, dtype=torch.int32)]
    for row in range(b):
        cu = torch.unique_consecutive(batch["cu_seqlens"][row].to(torch.int32))
        bounds.append(cu[1:] + row * s)
    return {k: batch[k].reshape(1, b * s) for k in PACKED_KEYS}, torch.cat(bounds)


def encode_rows(rows: List[dict], tokenizer, seq_length: int, where: str,
                pack_multiple: Optional[int] = None) -> List[dict]:
    """Encode chat rows into padded SFT samples, or packed ones when `pack_multiple` (2*CP) is
    given; errors name the row."""
    encoded = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise ValueError(f"{where} row {i}: no 'messages' field")
        ids, mask = encode_chat(tokenizer, row["messages"])
        encoded.append((ids, mask, f"{where} row {i}"))
    if pack_multiple is not None:
        return pack_conversations(encoded, seq_length, tokenizer.pad, pack_multiple)
    return [sft_sample(ids, mask, seq_length, tokenizer.pad, what) for ids, mask, what in encoded]


def split_rows(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """Last 10% (at least one row) held out for validation."""
    n_valid = max(1, len(rows) // 10)
    return rows[:-n_valid], rows[-n_valid:]


@dataclass
class SFTOptions:
    """SFT's own options (the `sft` config section)."""

    packing: bool = False
    """Pack several conversations per sequence with document-masked attention (thd), each padded
    to a multiple of 2*CP; needs parallel.pp=1. False: one padded conversation each."""


class SFTStage(Stage):
    """Chat SFT on the one training loop."""

    entry, config_section, config_options = "posttrain.sft", "sft", SFTOptions
    help_keys = ("posttrain.data_path",)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.packing = cfg.sft.packing
        if self.packing and cfg.parallel.pp > 1:
            raise ConfigError(f"invalid config:\n  - sft.packing=true needs parallel.pp=1 "
                              f"(got {cfg.parallel.pp}): packed micro-batches are one thd sequence")

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        path = cfg.posttrain.data_path or SAMPLE
        tok = chat_tokenizer(cfg)
        multiple = 2 * cfg.parallel.cp if self.packing else None
        train_rows, valid_rows = split_rows(read_jsonl(path))
        train = encode_rows(train_rows, tok, cfg.data.seq_length, str(path), multiple)
        valid = encode_rows(valid_rows, tok, cfg.data.seq_length, str(path), multiple)
        train = Cycled(train, train_samples, cfg.train.seed)
        valid = Cycled(valid, valid_samples, cfg.train.seed + 1)
        return train, (valid if valid_samples else None)

    def forward_step(self, data_iterator, model):
        if not self.packing:
            batch = data.on_this_rank(next(data_iterator))
            output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
            return output, partial(masked_token_loss, batch["loss_mask"])
        packed, cu = join_packed(next(data_iterator))
        batch = data.packed_on_this_rank(packed, cu)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"],
                       packed_seq_params=data.packed_seq_params(cu))
        return output, partial(masked_token_loss, batch["loss_mask"])


if __name__ == "__main__":
    from megatron_ext.train import run_stage

    sys.exit(run_stage("sft"))
