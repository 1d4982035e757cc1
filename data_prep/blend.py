"""Blend specs: which indexed datasets a training run samples from, and with what weights.

The result of `BlendSpec.resolve()` is exactly what Megatron-Core's
`BlendedMegatronDatasetConfig.blend` takes: `([prefix, ...], [weight, ...])`, or
`([prefix, ...], None)` to concatenate the datasets at their natural sizes. Every prefix is
checked for its `.bin` and `.idx` before training starts, so a typo fails here with the file name
rather than deep inside dataset construction on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from data_prep.indexed import IndexedReader, bin_path, idx_path

MODES = ("weights", "tokens", "concat")
Blend = Tuple[List[str], Optional[List[float]]]


@dataclass
class BlendSource:
    """One dataset in a blend.

    `prefix`: path prefix of `PREFIX.bin` / `PREFIX.idx` (a trailing `.bin`/`.idx` is accepted).
    `weight`: the sampling weight in mode "weights"; in mode "tokens" a multiplier on the
    dataset's token count (2.0 = seen twice as often as its size alone implies); unused in "concat".
    """

    prefix: str
    weight: float = 1.0


@dataclass
class BlendSpec:
    """A list of sources and how to weight them.

    `mode`: "weights" uses each source's weight; "tokens" weights by token count (times the
    source's weight); "concat" passes no weights, so Megatron uses every dataset at its size.
    """

    sources: List[BlendSource] = field(default_factory=list)
    mode: str = "weights"

    def resolve(self) -> Blend:
        """Validate and return `(prefixes, normalized weights or None)` for Megatron-Core."""
        if self.mode not in MODES:
            raise ValueError(f"blend mode {self.mode!r} is not one of {MODES}")
        if not self.sources:
            raise ValueError("blend has no sources")
        prefixes = [_check_prefix(s.prefix) for s in self.sources]
        dupes = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if dupes:
            raise ValueError(f"blend lists {dupes} more than once; give each dataset one weight")
        if self.mode == "concat":
            return prefixes, None
        for s in self.sources:
            if not (isinstance(s.weight, (int, float)) and math.isfinite(s.weight) and s.weight > 0):
                raise ValueError(f"blend weight for {s.prefix!r} must be a positive number, got {s.weight!r}")
        raw = [s.weight for s in self.sources]
        if self.mode == "tokens":
            counts = [IndexedReader(p).num_tokens for p in prefixes]
            empty = [p for p, c in zip(prefixes, counts) if c == 0]
            if empty:
                raise ValueError(f"datasets with no tokens cannot be weighted by size: {empty}")
            raw = [w * c for w, c in zip(raw, counts)]
        total = float(sum(raw))
        return prefixes, [w / total for w in raw]

    @classmethod
    def from_list(cls, items: Sequence[Union[str, float]]) -> "BlendSpec":
        """Megatron-LM's `--data-path` form: `[w1, p1, w2, p2, ...]` or `[p1, p2, ...]` (concat)."""
        items = [str(x) for x in items]
        if items and all(is_number(x) for x in items[0::2]) and len(items) % 2 == 0:
            return cls([BlendSource(p, float(w)) for w, p in zip(items[0::2], items[1::2])], "weights")
        if any(is_number(x) for x in items):
            raise ValueError(f"blend list {items} mixes weights and paths; use 'w1 p1 w2 p2 ...' or 'p1 p2 ...'")
        return cls([BlendSource(p) for p in items], "concat")

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "BlendSpec":
        """From a config mapping: `{mode: tokens, sources: [{prefix: a, weight: 2}, "b", ...]}`."""
        unknown = set(cfg) - {"mode", "sources"}
        if unknown:
            raise ValueError(f"unknown blend keys {sorted(unknown)}; expected 'mode' and 'sources'")
        sources = []
        for i, s in enumerate(cfg.get("sources", [])):
            if isinstance(s, str):
                sources.append(BlendSource(s))
            elif isinstance(s, Mapping) and "prefix" in s and set(s) <= {"prefix", "weight"}:
                sources.append(BlendSource(str(s["prefix"]), s.get("weight", 1.0)))
            else:
                raise ValueError(f"blend source {i}: expected a prefix string or {{prefix, weight}}, got {s!r}")
        return cls(sources, cfg.get("mode", "weights"))


def make_blend(prefixes: Sequence[str], weights: Optional[Sequence[float]] = None, mode: Optional[str] = None) -> Blend:
    """Shortcut: `make_blend(["a", "b"], [0.3, 0.7])`, `make_blend(["a", "b"], mode="tokens")`;
    with neither weights nor mode the datasets are concatenated."""
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(f"{len(prefixes)} prefixes but {len(weights)} weights")
    mode = mode or ("weights" if weights is not None else "concat")
    weights = list(weights) if weights is not None else [1.0] * len(prefixes)
    return BlendSpec([BlendSource(p, w) for p, w in zip(prefixes, weights)], mode).resolve()


def _check_prefix(prefix: str) -> str:
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    missing = [str(p) for p in (bin_path(prefix), idx_path(prefix)) if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"blend dataset {prefix!r}: missing {', '.join(missing)}")
    return prefix


def is_number(x: str) -> bool:
    """`x` reads as a float (a blend weight, not a prefix)."""
    try:
        float(x)
        return True
    except ValueError:
        return False
