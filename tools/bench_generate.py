"""Generation throughput: the KV-cached path against full recompute, on the same model and prompts.

    python -m tools.bench_generate [model=qwen2_debug] [parallel.tp=2 parallel.pp=2 ...] \
        [--new-tokens 128] [--batch 1] [--prompt-len 32] [--ragged] [--repeats 1] [--json OUT]

Builds the named model with seeded random weights at the configured layout (Hydra overrides as
every entry point; more than one rank: launch under torchrun, or local gloo ranks are spawned),
generates `--new-tokens` greedy tokens for `--batch` seeded random prompts of `--prompt-len`
tokens (`--ragged`: lengths spread from half of it to all of it) with the KV cache
(`megatron_ext.generation`, the default of `tools.generate`) and with `use_cache=False` (the
previous `tools.generate`: the whole sequence recomputed for every token), and prints each
path's generated tokens/s (best of `--repeats`, after one short warm-up run per path), the
speedup, and whether both paths produced the same tokens. No end id: every row generates
exactly `--new-tokens`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Sequence

import torch

from megatron_ext.cli import load_config, parse_tool_args
from megatron_ext.config import ConfigError, validate
from megatron_ext.layout import min_world_size
from tools import ranks


def parse_args(argv: Sequence[str]):
    ap = argparse.ArgumentParser(prog="python -m tools.bench_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--ragged", action="store_true", help="prompt lengths from prompt-len/2 to prompt-len")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    ap.add_argument("--json", help="also write the result here")
    args, rest = parse_tool_args(ap, argv)
    if args.new_tokens < 1 or args.batch < 1 or args.prompt_len < 1 or args.repeats < 1:
        ap.error("--new-tokens, --batch, --prompt-len and --repeats must be >= 1")
    return args, rest


def prompts_for(batch: int, length: int, ragged: bool, vocab: int, seed: int = 0) -> List[List[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [length] * batch if not ragged or batch == 1 else \
        [max(1, length // 2 + (length - length // 2) * i // (batch - 1)) for i in range(batch)]
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _time(fn, repeats: int):
    best, out = None, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, out


def _bench_rank(overrides: List[str], args) -> Dict:
    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.generation import SamplingParams, generate
    from megatron_ext.transformer import transformer_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(overrides)
    init_parallel(cfg)
    chunks = build_model(cfg, transformer_config(cfg))
    prompts = prompts_for(args.batch, args.prompt_len, args.ragged, cfg.model.vocab_size)
    n = args.new_tokens
    result = {"model": cfg.model.name, "layout": dict(tp=cfg.parallel.tp, pp=cfg.parallel.pp, sp=cfg.parallel.sp),
              "batch": args.batch, "prompt_lengths": [len(p) for p in prompts], "new_tokens": n,
              "threads": torch.get_num_threads()}
    runs = {}
    for name, use_cache in (("cached", True), ("recompute", False)):
        generate(chunks, prompts, SamplingParams(min(4, n), greedy=True), use_cache=use_cache)  # warm-up
        params = SamplingParams(n, greedy=True)
        seconds, out = _time(lambda: generate(chunks, prompts, params, use_cache=use_cache), args.repeats)
        runs[name] = out.tokens
        result[name] = {"seconds": round(seconds, 4), "tokens_per_s": round(args.batch * n / seconds, 2)}
    result["speedup"] = round(result["cached"]["tokens_per_s"] / result["recompute"]["tokens_per_s"], 2)
    result["same_tokens"] = runs["cached"] == runs["recompute"]
    return result


def format_result(r: Dict) -> str:
    layout = ", ".join(f"{k}={v}" for k, v in r["layout"].items())
    lines = [f"model {r['model']} ({layout}), batch {r['batch']}, prompt lengths {r['prompt_lengths']}, "
             f"{r['new_tokens']} new tokens, {r['threads']} CPU thread(s) per rank"]
    for name, label in (("cached", "KV cache (default)"), ("recompute", "full recompute (use_cache=False)")):
        lines.append(f"  {label:34s} {r[name]['tokens_per_s']:10.1f} tokens/s  ({r[name]['seconds']:.3f} s)")
    lines.append(f"  speedup {r['speedup']:.2f}x; same greedy tokens: {r['same_tokens']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
        p = cfg.parallel
        if p.cp > 1:
            raise ConfigError("generation does not support context parallelism (parallel.cp=1)")
        world = min_world_size(p)
        validate(cfg, world, check_device=False)
        result = ranks.run(_bench_rank, world, overrides, args)
    except (ConfigError, ValueError, ranks.RankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
