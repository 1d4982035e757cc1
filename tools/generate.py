"""Sample continuations from a Megatron model: greedy or temperature / top-p, batched, KV-cached.

    python -m tools.generate --ckpt CKPT --prompt "2+3=" --max-new-tokens 16 [--greedy]
        [--temperature 0.8 --top-p 0.95 --seed 0] [--tokens "1,2,3;4,5"] [--tp N --pp N] [--out gen.jsonl]
        [--eos ID] [--stop TEXT ...] [--chat [--chat-template auto|chatml|PATH]] [--no-cache]

`--chat` puts each --prompt in the model's chat template (one user turn, then the assistant's
opening: the template stored with the tokenizer's HF directory, plain ChatML for the bundled Qwen
tokenizers; `--chat-template` chooses as `posttrain.chat_template` does, see `data_prep.chat`)
and stops a row at ChatML's `<|im_end|>` / `<|endoftext|>`; `--stop` ends a row once its
text contains the string (the row's "text" is cut before it); `--no-cache` recomputes the whole
sequence for every new token (the reference path; slow).

Python API (used by synthetic-data rejection sampling and GRPO rollouts; implemented in
`megatron_ext.generation`, see its doc), on an already built model (a training Runtime, its DDP
chunks, or bare GPTModel chunks), collective over the model-parallel group:

    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, greedy=False, seed=0,
                            eos_token_id=None, stop=None)
    out = generate(rt, [[1, 2, 3], [4, 5]], params, decode=None, use_cache=True)
    out.tokens[i]    # generated ids of prompt i (without the prompt), stopped after EOS / a stop string
    out.logprobs[i]  # log-prob of each generated id under the model (temperature 1, no top-p)

Decoding keeps a KV cache (Megatron-Core's StaticInferenceContext) at every tensor / sequence /
pipeline layout; prompts of different lengths give each row exactly its single-prompt tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from megatron_ext.generation import (Generation, SamplingParams, chatml_stop_ids, check_prompts, cut_at_stop,
                                     generate, sample_next)
from tools import ranks
from megatron_ext import checkpoint, offline

__all__ = ["Generation", "SamplingParams", "generate", "sample_next", "chatml_stop_ids", "main"]


def _tokenizer(src: checkpoint.Source, name: Optional[str]):
    from data_prep.tokenizer import get_tokenizer

    choice = name or (str(src.tokenizer_dir) if src.tokenizer_dir else src.tokenizer_name)
    if not choice:
        raise ValueError("the checkpoint names no tokenizer: pass --tokenizer (a Qwen family or an HF dir) or --tokens")
    return get_tokenizer(choice)


def chat_prompt_ids(tok, prompts: List[str], chat_template: str = "auto") -> List[List[int]]:
    """Each prompt as one user turn plus the assistant's opening, in the chosen chat template
    (`auto`: the tokenizer's own, plain ChatML without one; see `data_prep.chat`)."""
    from data_prep.chat import encode_chat, set_chat_template

    set_chat_template(tok, chat_template)
    return [encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]


def _generate_rank(ckpt: str, prompts: List[str], ids: Optional[List[List[int]]], params: SamplingParams,
                   opts: dict, layout: dict):
    src = checkpoint.open_checkpoint(ckpt)
    needs_tok = ids is None or opts["decode"] or params.stop or opts["chat"]
    tok = _tokenizer(src, opts["tokenizer"]) if needs_tok else None
    if ids is None:
        if opts["chat"]:
            ids = chat_prompt_ids(tok, prompts, opts.get("chat_template", "auto"))
        else:
            ids = [tok.encode(p) for p in prompts]
    if opts["chat"]:  # the end of a chat turn ends a row too
        eos = params.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        params = dataclasses.replace(params, eos_token_id=eos + chatml_stop_ids(tok))
    chunks = offline.build(offline.layout_config(src.model, src.dtype, **layout))
    checkpoint.load_weights(chunks, src)
    check_prompts(ids, src.model.vocab_size)
    out = generate(chunks, ids, params, decode=tok.decode if params.stop else None, use_cache=opts["use_cache"])
    rows = [{"prompt_ids": p, "ids": t, "logprobs": lp, "finished": f}
            for p, t, lp, f in zip(ids, out.tokens, out.logprobs, out.finished)]
    if tok is not None:
        for row in rows:
            row["text"], hit = cut_at_stop(tok.decode(row["ids"]), params.stop)
            if hit is not None:
                row["stop"] = hit
    offline.release_layout()
    return rows


def main(argv=None) -> int:
    """Command-line entry; prints one JSON line per prompt (or writes --out); 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a tools.convert checkpoint or a training checkpoint")
    ap.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    ap.add_argument("--tokens", help='prompt ids instead of text, e.g. "1,2,3;4,5"')
    ap.add_argument("--tokenizer", help="override the checkpoint's tokenizer (Qwen family name or HF dir)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eos", type=int, default=None, help="stop a row at this token id")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", help="write jsonl here instead of stdout")
    ap.add_argument("--stop", action="append", help="stop a row once its text contains this (repeatable)")
    ap.add_argument("--chat", action="store_true",
                    help="wrap each --prompt in the chat template; stop at <|im_end|> / <|endoftext|>")
    ap.add_argument("--chat-template", default="auto",
                    help="with --chat: auto (the tokenizer's own template, else ChatML), chatml, "
                         "or a .jinja file / HF directory")
    ap.add_argument("--no-cache", action="store_true", help="recompute the full sequence per token (reference)")
    ap.add_argument("--no-verify", action="store_true",
                    help="do not check a training checkpoint's files against its CRC manifest")
    a = ap.parse_args(argv)
    if bool(a.prompt) == bool(a.tokens):
        print("error: give --prompt (one or more) or --tokens, not both", file=sys.stderr)
        return 2
    try:
        ids = [[int(t) for t in row.split(",") if t.strip()] for row in a.tokens.split(";")] if a.tokens else None
        params = SamplingParams(a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, greedy=a.greedy,
                                seed=a.seed, eos_token_id=a.eos, stop=a.stop)
        opts = dict(tokenizer=a.tokenizer, decode=a.prompt is not None, chat=a.chat, chat_template=a.chat_template,
                    use_cache=not a.no_cache)
        if a.chat and not a.prompt:
            raise ValueError("--chat formats --prompt text (not --tokens)")
        layout = dict(tp=a.tp, pp=a.pp)
        src = checkpoint.open_checkpoint(a.ckpt, verify=not a.no_verify)  # the ranks' load_weights checks the manifest
        world = offline.world_size(offline.layout_config(src.model, src.dtype, **layout))
        rows = ranks.run(_generate_rank, world, src, a.prompt or [], ids, params, opts, layout)
    except (ValueError, KeyError, FileNotFoundError, ranks.RankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
