"""The jsonl record shared by every synthetic generator (what `data_prep.tokenize` reads)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable


def make_record(text: str, domain: str, kind: str, source: str, generator: str, seed: int, index: int,
                **fields) -> dict:
    """A verified training document with provenance; `id` is a content hash (stable across runs)."""
    return {"text": text, "domain": domain, "kind": kind, "source": source, "generator": generator,
            "seed": seed, "index": index, "verified": True,
            "id": hashlib.sha256(text.encode()).hexdigest()[:16], **fields}


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write records (one JSON object per line) atomically; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
