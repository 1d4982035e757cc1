"""ChatML formatting for SFT and preference data, and sequence packing.

Qwen's chat format is ChatML: each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
`encode_chat` produces exactly the ids that Hugging Face's `apply_chat_template` gives for the
plain ChatML template (special tokens split first, each text span between them BPE-encoded as a
whole), plus a loss mask that is 1 only on assistant content and the `<|im_end|>` that closes it,
so the model learns to stop. The mask is aligned with the ids (mask[i] == 1 means id i is a
target); shifting for next-token prediction is the training side's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

import numpy as np

ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages: Sequence[Mapping]) -> None:
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")


def _header_token_count(tokenizer, ids: List[int], header: str) -> int:
    """How many leading ids belong to `header` ("role\\n") inside the jointly encoded turn.

    Usually the header's own encoding is a prefix of the turn's; when BPE merges across the
    boundary (content starting with a newline), the token that straddles it counts as header,
    so the loss never covers prompt bytes.
    """
    head = tokenizer.encode(header)
    if ids[: len(head)] == head:
        return len(head)
    n_bytes = len(header.encode("utf-8"))
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k]).encode("utf-8")) >= n_bytes:
            return k
    return len(ids)


def encode_chat(tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = False
                ) -> Tuple[List[int], List[int]]:
    """ChatML-encode `messages`; return `(ids, loss_mask)` with loss on assistant turns only.

    `add_generation_prompt` appends `<|im_start|>assistant\\n` (no loss), as for inference or as
    the prompt half of a preference pair.
    """
    _check_messages(messages)
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    newline = tokenizer.encode("\n")
    ids: List[int] = []
    mask: List[int] = []
    for m in messages:
        header = f"{m['role']}\n"
        body = tokenizer.encode(header + m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        n_head = _header_token_count(tokenizer, body, header) if learn else len(body)
        ids += [im_start] + body + [im_end] + newline
        mask += [0] + [0] * n_head + [learn] * (len(body) - n_head) + [learn] + [0] * len(newline)
    if add_generation_prompt:
        gen = [im_start] + tokenizer.encode("assistant\n")
        ids += gen
        mask += [0] * len(gen)
    return ids, mask


@dataclass
class PreferencePair:
    """Token ids of one preference example; both sides share the prompt ids exactly."""

    prompt_ids: List[int]
    chosen_ids: List[int]
    chosen_mask: List[int]
    rejected_ids: List[int]
    rejected_mask: List[int]


def format_preference(tokenizer, prompt, chosen: str, rejected: str) -> PreferencePair:
    """(prompt, chosen, rejected) -> paired ids for DPO/RM.

    `prompt` is a string (one user turn) or a list of ChatML messages ending before the reply.
    Each side is the full conversation with the reply as a final assistant turn, encoded by
    `encode_chat`, so the ids are what the chat template gives. Both sides must start with the
    same prompt ids (`<|im_start|>assistant\\n` included); a reply that starts with whitespace
    and a newline would merge into the header's newline token and is rejected with a message.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    out = []
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = encode_chat(tokenizer, messages + [{"role": "assistant", "content": resp}])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{name} response {resp[:30]!r} changes the prompt's tokens "
                             "(it starts with a newline); strip leading newlines")
        out.append((ids, mask))
    return PreferencePair(prompt_ids, out[0][0], out[0][1], out[1][0], out[1][1])


@dataclass
class Pack:
    """One packed training sequence.

    `cu_seqlens` are the cumulative document boundaries (int32, starting at 0); when the pack is
    padded, the padding forms a last segment so `cu_seqlens[-1] == len(tokens)`, which is what
    variable-length attention kernels (THD layout) expect. `doc_ids` name the source samples.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    cu_seqlens: np.ndarray
    doc_ids: List[int]


def pack_sequences(samples: Sequence[Tuple[Sequence[int], Sequence[int]]], seq_length: int,
                   pad_id: int, overflow: str = "truncate") -> List[Pack]:
    """Pack `(ids, loss_mask)` samples into sequences of exactly `seq_length` tokens.

    First-fit decreasing by length (deterministic: ties keep input order), so packs are dense and
    a sample is never split across packs. Samples longer than `seq_length` are truncated
    (`overflow="truncate"`), dropped (`"drop"`) or raise (`"error"`).
    """
    if overflow not in ("truncate", "drop", "error"):
        raise ValueError(f"overflow must be 'truncate', 'drop' or 'error', got {overflow!r}")
    items = []
    for i, (ids, mask) in enumerate(samples):
        if len(ids) != len(mask):
            raise ValueError(f"sample {i}: {len(ids)} ids but {len(mask)} mask entries")
        if len(ids) == 0:
            raise ValueError(f"sample {i} is empty")
        if len(ids) > seq_length:
            if overflow == "error":
                raise ValueError(f"sample {i} has {len(ids)} tokens > seq_length {seq_length}")
            if overflow == "drop":
                continue
            ids, mask = ids[:seq_length], mask[:seq_length]
        items.append((i, list(ids), list(mask)))
    items.sort(key=lambda t: -len(t[1]))  # stable sort: equal lengths keep input order
    bins: List[List[tuple]] = []
    free: List[int] = []
    for item in items:
        n = len(item[1])
        slot = next((b for b, room in enumerate(free) if room >= n), None)
        if slot is None:
            bins.append([])
            free.append(seq_length)
            slot = len(bins) - 1
        bins[slot].append(item)
        free[slot] -= n
    return [_make_pack(b, seq_length, pad_id) for b in bins]


def _make_pack(items: List[tuple], seq_length: int, pad_id: int) -> Pack:
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.int64)
    bounds = [0]
    for _, ids, mask in items:
        start = bounds[-1]
        tokens[start:start + len(ids)] = ids
        loss_mask[start:start + len(ids)] = mask
        bounds.append(start + len(ids))
    if bounds[-1] < seq_length:
        bounds.append(seq_length)
    return Pack(tokens, loss_mask, np.asarray(bounds, dtype=np.int32), [i for i, _, _ in items])
