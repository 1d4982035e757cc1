"""Summarize a Megatron indexed dataset: `python -m data_prep.inspect PREFIX [--samples N]`.

Prints the token dtype, document and token counts, length statistics, a log2 length histogram,
how many documents end in `<|endoftext|>`, and decodes a few random documents.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import numpy as np

from data_prep.indexed import IndexedReader


def histogram(lengths: np.ndarray, width: int = 40) -> List[str]:
    """Power-of-two buckets [2^k, 2^(k+1)) with a bar per bucket."""
    if len(lengths) == 0:
        return ["(no documents)"]
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    counts = np.bincount(buckets)
    top = counts.max()
    rows = []
    for k, c in enumerate(counts):
        if c == 0:
            continue
        bar = "#" * max(1, round(width * c / top))
        rows.append(f"  [{2 ** k:>8}, {2 ** (k + 1):>8})  {c:>10,}  {bar}")
    return rows


def describe(prefix: str, tokenizer: Optional[str] = "qwen2", samples: int = 2, seed: int = 0,
             max_chars: int = 400) -> str:
    """The report `inspect` prints, as a string."""
    ds = IndexedReader(prefix)
    lengths = np.asarray(ds.lengths, dtype=np.int64)
    out = [f"dataset   {prefix}", f"dtype     {ds.dtype}", f"documents {len(ds):,}", f"tokens    {ds.num_tokens:,}"]
    if len(ds):
        out.append(f"length    min {lengths.min():,}  mean {lengths.mean():,.1f}  median {np.median(lengths):,.0f}  "
                   f"p99 {np.percentile(lengths, 99):,.0f}  max {lengths.max():,}")
        zero = int((lengths == 0).sum())
        if zero:
            out.append(f"WARNING   {zero:,} zero-length documents")
    out.append("length histogram (tokens):")
    out += histogram(lengths)
    if tokenizer and len(ds):
        from data_prep.tokenizer import get_tokenizer

        tok = get_tokenizer(tokenizer)
        ends = int((ds.last_tokens() == tok.eod).sum())
        out.append(f"ending in eod ({tok.eod}): {ends:,} of {len(ds):,}")
        rng = np.random.default_rng(seed)
        for i in sorted(rng.choice(len(ds), size=min(samples, len(ds)), replace=False).tolist()):
            text = tok.decode(ds[i].tolist())
            more = f" ... [{len(text) - max_chars:,} more chars]" if len(text) > max_chars else ""
            out.append(f"--- document {i} ({lengths[i]:,} tokens) ---\n{text[:max_chars]}{more}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__.split("\n")[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--tokenizer", default="qwen2", help="for decoding samples; 'none' to skip")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=400)
    a = p.parse_args(argv)
    prefix = a.prefix[:-4] if a.prefix.endswith((".bin", ".idx")) else a.prefix
    try:
        print(describe(prefix, None if a.tokenizer == "none" else a.tokenizer, a.samples, a.seed, a.max_chars))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
