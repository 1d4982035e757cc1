"""Chat formatting for SFT and preference data, and sequence packing.

Two renderings, one interface (`encode_chat`):

- Plain ChatML (the default, and what the bundled Qwen tokenizers use): each turn is
  `<|im_start|>{role}\\n{content}<|im_end|>\\n`, exactly the ids that Hugging Face's
  `apply_chat_template` gives for the plain ChatML template (special tokens split first, each
  text span between them BPE-encoded as a whole).
- The model's own chat template, when the tokenizer carries one (`tokenizer.chat_template`: an
  HF tokenizer directory's `chat_template.jinja` or `tokenizer_config.json` `chat_template`, or
  one set with `posttrain.chat_template`). Real Qwen templates differ from plain ChatML:
  Qwen2.5-Instruct inserts a default system prompt when there is none, Qwen3 wraps the reply
  after the last user turn in a think block (empty when there is no reasoning) and drops the
  reasoning of earlier turns. The conversation is rendered once with transformers' Jinja
  renderer (the environment `apply_chat_template` uses) and tokenized as a whole, so the ids
  equal `apply_chat_template(..., tokenize=True)`. Assistant spans come from prefix renderings:
  reply i starts where the rendering of `messages[:i]` with the generation prompt ends (which
  must be a prefix of the whole rendering) and ends with the first `<|im_end|>` after it
  (the tokenizer's end-of-document token for templates without `<|im_end|>`). Token ids map to
  characters by their offsets; a token belongs to the reply when it starts inside it.

The loss mask is 1 only on what the model generates for an assistant turn: its content (for
Qwen3 also the think block the template puts before it) and the `<|im_end|>` that closes it, so
the model learns to stop. The `\\n` the template writes after `<|im_end|>` is never a target
(TRL counts it as part of the reply): generation stops at `<|im_end|>`, so that token is never
sampled, and in DPO its log-ratio is noise added to every reward. A token that straddles the
prompt/reply boundary (a reply starting with a newline merges with the header's newline) counts
as prompt, so the loss never covers prompt bytes. The mask is aligned with the ids (mask[i] == 1
means id i is a target); shifting for next-token prediction is the training side's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

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
    """Encode `messages` with the tokenizer's chat template (plain ChatML when it has none);
    return `(ids, loss_mask)` with loss on assistant replies only (see the module docstring).

    `add_generation_prompt` appends the template's assistant header (`<|im_start|>assistant\\n`,
    no loss), as for inference or as the prompt half of a preference pair.
    """
    _check_messages(messages)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return encode_with_template(tokenizer, template, messages, add_generation_prompt)
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


TEMPLATE_CHOICES = ("auto", "chatml")


def read_chat_template(path) -> Optional[str]:
    """The chat template stored with a Hugging Face tokenizer or checkpoint, or None.

    `path` is a directory (its `chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template`), a `tokenizer.json` / `tokenizer_config.json` file (its directory), or a
    template file itself (`.jinja` or any other text). A `chat_template` stored as a list of
    named templates gives the one named "default".
    """
    import json

    path = Path(path)
    if path.is_file() and path.name not in ("tokenizer.json", "tokenizer_config.json"):
        return path.read_text(encoding="utf-8")
    directory = path if path.is_dir() else path.parent
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    with open(cfg, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template or None


def set_chat_template(tokenizer, choice: str = "auto"):
    """Apply a `posttrain.chat_template` choice to `tokenizer` (returned, changed in place).

    `auto`: keep the tokenizer's own template (an HF directory's; none for the bundled Qwen
    tokenizers, which use plain ChatML). `chatml`: plain ChatML even when the tokenizer has a
    template. Anything else is a path read by `read_chat_template` (a `.jinja` file, or an HF
    tokenizer/checkpoint directory); it must hold a template.
    """
    if choice in (None, "", "auto"):
        return tokenizer
    if choice == "chatml":
        tokenizer.chat_template = None
        return tokenizer
    if not Path(choice).exists():
        raise ValueError(f"chat template {choice!r}: no such file or directory "
                         f"(expected one of {TEMPLATE_CHOICES} or a path)")
    template = read_chat_template(choice)
    if not template:
        raise ValueError(f"chat template {choice!r}: no chat template there "
                         "(chat_template.jinja or tokenizer_config.json 'chat_template')")
    tokenizer.chat_template = template
    return tokenizer


def render_chat(tokenizer, template: str, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """`messages` rendered as text by a Jinja chat template, with transformers' renderer (the
    sandboxed environment and globals of `apply_chat_template`); the tokenizer's special-token
    strings (`eos_token`, ...) are passed as template variables, as transformers does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    extra = dict(getattr(tokenizer, "template_variables", None) or {})
    rendered, _ = render_jinja_template([[dict(m) for m in messages]], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **extra)
    return rendered[0]


def _turn_end(tokenizer) -> str:
    """The text that closes an assistant turn: `<|im_end|>` where the vocabulary has it."""
    try:
        if tokenizer.token_to_id("<|im_end|>") is not None:
            return "<|im_end|>"
    except (KeyError, ValueError):
        pass
    return tokenizer.decode([tokenizer.eod])


def assistant_spans(tokenizer, template: str, messages: Sequence[Mapping], text: str) -> List[Tuple[int, int]]:
    """Character spans `[start, end)` of the assistant replies inside `text`, the rendering of
    `messages`: a reply starts where the rendering of the messages before it plus the generation
    prompt ends, and ends after the first turn end (`<|im_end|>`) from there."""
    end_text = _turn_end(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("message 0: a conversation rendered with a chat template cannot start "
                             "with an assistant turn (no prompt to render before it)")
        prefix = render_chat(tokenizer, template, messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise ValueError(f"message {i}: the chat template renders the conversation before this "
                             "assistant turn differently once the turn follows, so its reply cannot "
                             "be located; use posttrain.chat_template=chatml or another template")
        start = len(prefix)
        stop = text.find(end_text, start)
        end = len(text) if stop < 0 else stop + len(end_text)
        answer = m["content"].split("</think>")[-1].strip()
        if answer and answer not in text[start:end]:
            raise ValueError(f"message {i}: the chat template does not render this reply where "
                             f"expected (between the generation prompt and {end_text!r})")
        spans.append((start, end))
    return spans


def encode_with_template(tokenizer, template: str, messages: Sequence[Mapping],
                         add_generation_prompt: bool = False) -> Tuple[List[int], List[int]]:
    """`encode_chat` for a tokenizer with a chat template: the whole rendering tokenized once
    (special-token strings become their ids, as in `apply_chat_template`), the mask from
    `assistant_spans` by token start offsets."""
    text = render_chat(tokenizer, template, messages, add_generation_prompt)
    spans = assistant_spans(tokenizer, template, messages, text)
    ids, starts = tokenizer.encode_rendered(text)
    mask = [int(any(a <= s < b for a, b in spans)) for s in starts]
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

    `prompt` is a string (one user turn) or a list of chat messages ending before the reply.
    Each side is the full conversation with the reply as a final assistant turn, encoded by
    `encode_chat`, so the ids are what the chat template gives (the tokenizer's own, else plain
    ChatML). Both sides must start with the prompt ids exactly (`<|im_start|>assistant\\n`
    included): the prompt is the conversation rendered with the generation prompt, and each
    reply's mask covers what follows it up to and including `<|im_end|>` (for Qwen3's template
    that includes the think block before the reply); assistant turns inside a multi-turn prompt
    are context, never scored. A reply that starts with whitespace and a
    newline would merge into the header's newline token and is rejected with a message.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    out = []
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = encode_chat(tokenizer, messages + [{"role": "assistant", "content": resp}])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{name} response {resp[:30]!r} changes the prompt's tokens "
                             "(it starts with a newline); strip leading newlines")
        # Only the reply is scored: assistant turns inside a multi-turn prompt are context.
        mask = [0] * len(prompt_ids) + mask[len(prompt_ids):]
        if not any(mask):
            raise ValueError(f"{name} response {resp[:30]!r} has no reply tokens after the prompt")
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
