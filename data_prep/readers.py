"""Reading documents from `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet`, with validation.

Every input record either yields a document text or a `Reject` with a reason and a 1-based
line number (row number for parquet) relative to the start of its shard. Plain `.jsonl` files
are split into byte-range chunks so one large file still spreads over several workers; a chunk
owns every line that *starts* inside its byte range, so chunks partition the lines exactly.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

# Reasons a record is skipped, in the order the summary reports them.
REASONS = ("blank_line", "invalid_utf8", "malformed_json", "missing_key", "not_string", "empty_text")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "gz", ".json.gz": "gz",
            ".jsonl.zst": "zst", ".json.zst": "zst", ".parquet": "parquet"}


@dataclass(frozen=True)
class Shard:
    """One unit of work: a whole file, or a byte range [start, end) of a plain `.jsonl`."""

    path: str
    kind: str
    chunk: int = 0
    start: int = 0
    end: int = -1


@dataclass
class Reject:
    line: int
    reason: str
    detail: str


def file_kind(path: str) -> str:
    name = path.lower()
    for suffix, kind in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return kind
    raise ValueError(f"{path}: unsupported input type; expected one of {sorted(SUFFIXES)}")


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand paths/globs (and directories, recursively) into a sorted, de-duplicated file list."""
    files: List[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            matches = [str(p) for p in Path(pat).rglob("*") if p.is_file() and _supported(str(p))]
        else:
            matches = glob.glob(pat, recursive=True)
        if not matches:
            raise FileNotFoundError(f"--input {pat!r} matches no file")
        files.extend(sorted(matches))
    seen, out = set(), []
    for f in files:
        file_kind(f)  # fail early, naming the file, on an unsupported type
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def _supported(path: str) -> bool:
    try:
        file_kind(path)
        return True
    except ValueError:
        return False


def plan_shards(files: Sequence[str], chunk_bytes: int) -> List[Shard]:
    """Split plain `.jsonl` files into byte chunks; other formats are one shard per file."""
    shards = []
    for path in files:
        kind = file_kind(path)
        size = os.path.getsize(path)
        if kind != "jsonl" or size <= chunk_bytes:
            shards.append(Shard(path, kind, 0, 0, size if kind == "jsonl" else -1))
            continue
        for i, start in enumerate(range(0, size, chunk_bytes)):
            shards.append(Shard(path, kind, i, start, min(start + chunk_bytes, size)))
    return shards


def _jsonl_chunk_lines(shard: Shard) -> Iterator[bytes]:
    with open(shard.path, "rb", buffering=1 << 20) as f:
        pos = shard.start
        if pos > 0:
            # The line that straddles `start` belongs to the previous chunk: skip to its end.
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < shard.end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            yield line


def _stream_lines(shard: Shard) -> Iterator[bytes]:
    if shard.kind == "jsonl":
        yield from _jsonl_chunk_lines(shard)
    elif shard.kind == "gz":
        import gzip

        with gzip.open(shard.path, "rb") as f:
            yield from io.BufferedReader(f, 1 << 20)
    elif shard.kind == "zst":
        import zstandard

        with open(shard.path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20)
            yield from io.BufferedReader(reader, 1 << 20)
    else:
        raise ValueError(f"{shard.path}: not a line-based file")


def parse_line(raw: bytes, key: str) -> Tuple[Optional[str], Optional[Tuple[str, str]]]:
    """Return `(text, None)` for a usable record or `(None, (reason, detail))`."""
    if not raw.strip():
        return None, ("blank_line", "line is empty")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, ("invalid_utf8", f"invalid UTF-8 byte at offset {e.start}: {raw[e.start:e.start + 4]!r}")
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, ("malformed_json", str(e))
    if not isinstance(obj, dict):
        return None, ("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    return check_text(obj.get(key, _MISSING), key, escaped=b"\\u" in raw or b"\\U" in raw)


_MISSING = object()


def check_text(text, key: str, escaped: bool = True) -> Tuple[Optional[str], Optional[Tuple[str, str]]]:
    """Validate one field value; `escaped` says the record may hold \\u escapes (lone surrogates)."""
    if text is _MISSING:
        return None, ("missing_key", f"no {key!r} field")
    if not isinstance(text, str):
        return None, ("not_string", f"{key!r} is {type(text).__name__}, not a string")
    if escaped:
        # JSON may spell a lone surrogate (\ud800); such a string has no UTF-8 encoding.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return None, ("invalid_utf8", f"lone surrogate at character {e.start}")
    if not text.strip():
        return None, ("empty_text", f"{key!r} is empty or whitespace only")
    return text, None


Batch = Tuple[List[int], List[str], List[Reject], int, int]


def iter_batches(shard: Shard, key: str, batch_size: int = 1024) -> Iterator[Batch]:
    """Yield `(line_numbers, texts, rejects, lines_read, bytes_read)` batches for a shard."""
    if shard.kind == "parquet":
        yield from _parquet_batches(shard, key, batch_size)
        return
    nums, texts, rejects, nbytes, lineno = [], [], [], 0, 0
    for lineno, raw in enumerate(_stream_lines(shard), 1):
        nbytes += len(raw)
        text, bad = parse_line(raw, key)
        if bad is None:
            nums.append(lineno)
            texts.append(text)
        else:
            rejects.append(Reject(lineno, *bad))
        if len(nums) + len(rejects) >= batch_size:
            yield nums, texts, rejects, len(nums) + len(rejects), nbytes
            nums, texts, rejects, nbytes = [], [], [], 0
    if nums or rejects or nbytes:
        yield nums, texts, rejects, len(nums) + len(rejects), nbytes


def _parquet_batches(shard: Shard, key: str, batch_size: int) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    row = 0
    has_key = key in pf.schema_arrow.names
    # Size progress by the file's compressed bytes spread over its rows.
    bytes_per_row = os.path.getsize(shard.path) / max(pf.metadata.num_rows, 1)
    columns = [key] if has_key else [pf.schema_arrow.names[0]]
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        values = batch.column(0).to_pylist() if has_key else [_MISSING] * batch.num_rows
        nums, texts, rejects = [], [], []
        for v in values:
            row += 1
            text, bad = check_text(v, key, escaped=False)
            if bad is None:
                nums.append(row)
                texts.append(text)
            else:
                rejects.append(Reject(row, *bad))
        yield nums, texts, rejects, len(values), int(len(values) * bytes_per_row)


def count_lines_before(shard: Shard) -> int:
    """Number of lines in the file before this chunk's first line (for absolute line numbers)."""
    if shard.kind != "jsonl" or shard.start == 0:
        return 0
    count = 0
    with open(shard.path, "rb") as f:
        f.seek(shard.start - 1)
        first = shard.start - 1 + len(f.readline())  # offset of the chunk's first line
        f.seek(0)
        remaining = first
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count
