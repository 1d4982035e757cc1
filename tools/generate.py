"""Sample continuations from a Megatron model: greedy or temperature / top-p, batched.

    python -m tools.generate --ckpt CKPT --prompt "2+3=" --max-new-tokens 16 [--greedy]
        [--temperature 0.8 --top-p 0.95 --seed 0] [--tokens "1,2,3;4,5"] [--tp N --pp N] [--out gen.jsonl]

Python API (used by synthetic-data rejection sampling and GRPO rollouts), on an already built
model (a training Runtime, its DDP chunks, or bare GPTModel chunks), collective over the
model-parallel group:

    out = generate(rt, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=1.0, top_p=1.0,
                   greedy=False, seed=0, eos_token_id=None)
    out.tokens[i]    # generated ids of prompt i (without the prompt), stopped after EOS
    out.logprobs[i]  # log-prob of each generated id under the model (temperature 1, no top-p)

Decoding recomputes the full sequence every step (no KV cache): Megatron-Core's inference
context is built around its GPU engines and our CPU attention, so the first version keeps the
one forward path the model trains with, exact at every tensor/pipeline layout; the cost is
O(steps * length) forward tokens, fine for the short rollouts of tests and small models.
Prompts of different lengths are right-padded: attention is causal, so a row's real tokens
never see the padding after them, and each row reads its logits at its own last position.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state

from tools import launch
from tools import mcore_ckpt as mc
from tools.logits import forward_logits


@dataclass
class Generation:
    """Generated ids (prompt excluded) and their model log-probs, per prompt."""

    tokens: List[List[int]]
    logprobs: List[List[float]]
    finished: List[bool]
    """True where the row stopped at eos_token_id (False: it hit max_new_tokens)."""


def _chunks(rt_or_model) -> List[torch.nn.Module]:
    model = getattr(rt_or_model, "model", rt_or_model)  # a Runtime carries .model
    return list(model) if isinstance(model, (list, tuple)) else [model]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                generator: torch.Generator) -> torch.Tensor:
    """Next ids [batch] from logits [batch, vocab]: argmax, or temperature + nucleus sampling."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(prompts, max_new_tokens, temperature, top_p, vocab: Optional[int]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: need at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if vocab is not None and any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ValueError(f"generate: prompt token ids must be in [0, {vocab})")
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("generate: context parallelism is not supported for sampling (use cp=1)")


def _seq_multiple(chunks) -> int:
    cfg = getattr(chunks[0], "config", None)
    return cfg.tensor_model_parallel_size if cfg is not None and cfg.sequence_parallel else 1


def _share_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """Pipeline stages other than the last get the sampled ids / log-probs from it."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(t, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return t


def generate(rt_or_model, prompts_token_ids: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
             eos_token_id: Optional[int] = None) -> Generation:
    """Continue each prompt by up to `max_new_tokens` ids (see module doc). Collective."""
    chunks = _chunks(rt_or_model)
    _check_args(prompts_token_ids, max_new_tokens, temperature, top_p, None)
    batch = len(prompts_token_ids)
    lengths = torch.tensor([len(p) for p in prompts_token_ids])
    total = int(lengths.max()) + max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long)
    for i, p in enumerate(prompts_token_ids):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out_ids = torch.zeros(batch, max_new_tokens, dtype=torch.long)
    out_lp = torch.zeros(batch, max_new_tokens)
    done = torch.zeros(batch, dtype=torch.bool)
    n_new = torch.zeros(batch, dtype=torch.long)
    mult = _seq_multiple(chunks)
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        for step in range(max_new_tokens):
            width = int((lengths + n_new).max())
            width = -(-width // mult) * mult
            logits = forward_logits(chunks, tokens[:, :width].contiguous())
            nxt, lp = torch.zeros(batch, dtype=torch.long), torch.zeros(batch)
            if logits is not None:  # last pipeline stage
                last = logits[torch.arange(batch), lengths + n_new - 1]  # [batch, vocab]
                nxt = sample_next(last, temperature, top_p, greedy, gen)
                lp = torch.log_softmax(last.float(), -1).gather(-1, nxt[:, None]).squeeze(-1)
            nxt, lp = _share_from_last_stage(nxt), _share_from_last_stage(lp)
            live = ~done
            out_ids[live, step], out_lp[live, step] = nxt[live], lp[live]
            tokens[live.nonzero().squeeze(-1), (lengths + n_new)[live]] = nxt[live]
            n_new += live.long()
            if eos_token_id is not None:
                done |= live & (nxt == eos_token_id)
            if bool(done.all()):
                break
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)
    counts = n_new.tolist()
    return Generation([out_ids[i, :counts[i]].tolist() for i in range(batch)],
                      [out_lp[i, :counts[i]].tolist() for i in range(batch)], done.tolist())


def _tokenizer(src: mc.Source, name: Optional[str]):
    from data_prep.tokenizer import get_tokenizer

    choice = name or (str(src.tokenizer_dir) if src.tokenizer_dir else src.tokenizer_name)
    if not choice:
        raise ValueError("the checkpoint names no tokenizer: pass --tokenizer (a Qwen family or an HF dir) or --tokens")
    return get_tokenizer(choice)


def _generate_rank(ckpt: str, prompts: List[str], ids: Optional[List[List[int]]], opts: dict, layout: dict):
    src = mc.open_checkpoint(ckpt)
    tok = None if ids is not None and not opts["decode"] else _tokenizer(src, opts["tokenizer"])
    if ids is None:
        ids = [tok.encode(p) for p in prompts]
    chunks = mc.build(mc.layout_config(src.model, src.dtype, **layout))
    mc.load(chunks, src)
    _check_args(ids, opts["max_new_tokens"], opts["temperature"], opts["top_p"], src.model.vocab_size)
    out = generate(chunks, ids, opts["max_new_tokens"], opts["temperature"], opts["top_p"], opts["greedy"],
                   opts["seed"], opts["eos"])
    rows = [{"prompt_ids": p, "ids": t, "logprobs": lp, "finished": f}
            for p, t, lp, f in zip(ids, out.tokens, out.logprobs, out.finished)]
    if tok is not None:
        for row in rows:
            row["text"] = tok.decode(row["ids"])
    mc.release_layout()
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
    ap.add_argument("--no-verify", action="store_true",
                    help="do not check a training checkpoint's files against its CRC manifest")
    a = ap.parse_args(argv)
    if bool(a.prompt) == bool(a.tokens):
        print("error: give --prompt (one or more) or --tokens, not both", file=sys.stderr)
        return 2
    try:
        ids = [[int(t) for t in row.split(",") if t.strip()] for row in a.tokens.split(";")] if a.tokens else None
        opts = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, greedy=a.greedy,
                    seed=a.seed, eos=a.eos, tokenizer=a.tokenizer, decode=a.prompt is not None)
        layout = dict(tp=a.tp, pp=a.pp)
        src = mc.open_checkpoint(a.ckpt, verify=not a.no_verify)  # the ranks' mc.load checks the manifest
        world = mc.world_size(mc.layout_config(src.model, src.dtype, **layout))
        rows = launch.run(_generate_rank, world, src, a.prompt or [], ids, opts, layout)
    except (ValueError, KeyError, FileNotFoundError, launch.RankError) as e:
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
