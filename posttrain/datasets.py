"""What a post-training stage reads: jsonl rows (bounded, errors naming file:line), the chat
tokenizer, padding to the sequence length, and small datasets walked in seeded epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from data_prep.readers import read_json_lines
from megatron_ext.config import Config, ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data"


def read_jsonl(path) -> List[dict]:
    """Rows of a jsonl file (errors name the file and line; see `read_jsonl_lines`)."""
    return [row for _, row in read_jsonl_lines(path)]



def read_jsonl_lines(path) -> List[Tuple[int, dict]]:
    """(line number, row) of each non-empty line of a jsonl file (`.jsonl.gz` / `.jsonl.zst` too),
    for errors that name the line.

    The file may come from anyone: it is read by `data_prep.readers.read_json_lines`, with the
    limits of `data_prep.tokenize`. A line that is not a JSON object is a ValueError
    "PATH:LINE: REASON: DETAIL": malformed_json, invalid_utf8, corrupt_file (damaged compressed
    data), too_deep (nested deeper than MAX_JSON_DEPTH = 100 levels, refused before json.loads
    recurses) or too_large (longer than DEFAULT_MAX_RECORD_BYTES = 16 MiB, skipped unread, so
    reading holds at most that much of one line). 16 MiB is about 4M tokens, far beyond any
    data.seq_length a row has to fit, so no setting raises the limit."""
    return list(read_json_lines(path))



def chat_tokenizer(cfg: Config):
    """data.tokenizer with the chat rendering `posttrain.chat_template` chooses (`auto`: the
    tokenizer's own template, plain ChatML without one; `chatml`; or a template path)."""
    from data_prep.chat import set_chat_template
    from data_prep.tokenizer import get_tokenizer

    tok = get_tokenizer(cfg.data.tokenizer)
    try:
        return set_chat_template(tok, cfg.posttrain.chat_template)
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  - posttrain.chat_template: {e}") from None



def pad_to(ids: Sequence[int], length: int, pad: int, what: str) -> List[int]:
    """Right-pad `ids` to `length`; a sample that does not fit is an error naming it."""
    if len(ids) > length:
        raise ValueError(f"{what} has {len(ids)} tokens > data.seq_length={length}; raise data.seq_length")
    return list(ids) + [pad] * (length - len(ids))



class Cycled(torch.utils.data.Dataset):
    """`items` repeated (each epoch in a fresh seeded order) up to `length` samples.

    The loop asks for steps * global_batch samples; a small dataset is walked in epochs.
    `unit` keeps groups of consecutive items together (2 for chosen/rejected pairs).
    """

    def __init__(self, items: Sequence, length: int, seed: int, unit: int = 1):
        if not items:
            raise ValueError("empty dataset")
        self.items, self.unit, self.seed = items, unit, seed
        self.length = max(length, len(items))
        self._orders: Dict[int, List[int]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        groups = len(self.items) // self.unit
        epoch, pos = divmod(i // self.unit, groups)
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._orders[epoch] = torch.randperm(groups, generator=g).tolist()
        return self.items[self._orders[epoch][pos] * self.unit + i % self.unit]
