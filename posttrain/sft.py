"""SFT: next-token loss on assistant tokens of ChatML conversations.

`python -m posttrain.sft [k=v ...]` trains on `posttrain.data_path` (jsonl rows with
"messages") or the bundled sample. Each sample is one conversation right-padded to
data.seq_length; the loss mask (from `data_prep.chat.encode_chat`) covers assistant content
and its closing `<|im_end|>` only, shifted to the label positions. Loss is summed per token
and normalised by the global count of assistant tokens (reported as the per-token loss).
Packing several conversations per sequence (document-masked attention) is not done yet:
one padded conversation per sequence keeps attention within the conversation.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import List, Sequence, Tuple

import torch

from data_prep.chat import encode_chat
from data_prep.tokenizer import get_tokenizer
from megatron_ext import data
from megatron_ext.config import Config
from megatron_ext.pretrain import masked_token_loss
from posttrain.common import DATA_DIR, Cycled, pad_to, read_jsonl, run_cli

SAMPLE = DATA_DIR / "sft_sample.jsonl"


def sft_sample(ids: Sequence[int], mask: Sequence[int], seq_length: int, pad: int, what: str) -> dict:
    """Shift (ids, mask) for next-token prediction and pad: tokens[i] predicts labels[i]."""
    tokens = pad_to(ids[:-1], seq_length, pad, what)
    labels = pad_to(ids[1:], seq_length, pad, what)
    loss_mask = pad_to(mask[1:], seq_length, 0, what)
    return {"tokens": torch.tensor(tokens), "labels": torch.tensor(labels),
            "loss_mask": torch.tensor(loss_mask, dtype=torch.float32),
            "position_ids": torch.arange(seq_length)}


def encode_rows(rows: List[dict], tokenizer, seq_length: int, where: str) -> List[dict]:
    """Encode chat rows into padded SFT samples; errors name the row."""
    out = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise ValueError(f"{where} row {i}: no 'messages' field")
        ids, mask = encode_chat(tokenizer, row["messages"])
        out.append(sft_sample(ids, mask, seq_length, tokenizer.pad, f"{where} row {i}"))
    return out


def split_rows(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """Last 10% (at least one row) held out for validation."""
    n_valid = max(1, len(rows) // 10)
    return rows[:-n_valid], rows[-n_valid:]


class SFTStage:
    """Chat SFT on the one training loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def datasets(self, cfg: Config, train_samples: int, valid_samples: int):
        path = cfg.posttrain.data_path or SAMPLE
        tok = get_tokenizer(cfg.data.tokenizer)
        train_rows, valid_rows = split_rows(read_jsonl(path))
        train = Cycled(encode_rows(train_rows, tok, cfg.data.seq_length, str(path)), train_samples, cfg.train.seed)
        valid = Cycled(encode_rows(valid_rows, tok, cfg.data.seq_length, str(path)), valid_samples, cfg.train.seed + 1)
        return train, (valid if valid_samples else None)

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        return output, partial(masked_token_loss, batch["loss_mask"])


if __name__ == "__main__":
    sys.exit(run_cli("sft", SFTStage))
