"""Reading documents from `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet`, with validation.

Every input record either yields a document text or a `Reject` with a reason and a 1-based
line number (row number for parquet) relative to the start of its shard. Plain `.jsonl` files
are split into byte-range chunks so one large file still spreads over several workers; a chunk
owns every line that *starts* inside its byte range, so chunks partition the lines exactly.

A compressed or parquet file that ends early or is corrupted gives every record read before the
damage, then one `corrupt_file` reject at the first line it could not read (that line and the
rest of the file are lost); the other files are unaffected.
"""

from __future__ import annotations

import glob
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

# Reasons a record is skipped, in the order the summary reports them.
REASONS = ("blank_line", "invalid_utf8", "malformed_json", "missing_key", "not_string", "empty_text", "corrupt_file")
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


class CorruptFileError(Exception):
    """A file's bytes cannot be read on from here (truncated or corrupted compressed data)."""


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


class _ChunkStream(io.RawIOBase):
    """A readable raw stream over an iterator of byte chunks (for BufferedReader's readline)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buf, self._pos = chunks, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            self._buf, self._pos = next(self._chunks, None), 0
            if self._buf is None:
                self._buf = b""
                return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n


def _frames(path: str, new_decompressor, fmt: str, errors: tuple) -> Iterator[bytes]:
    """Decompressed bytes of a file of concatenated gzip members / zstd frames, yielded as they
    are decoded; damage raises CorruptFileError only after everything before it was yielded (the
    gzip module's reader drops up to a buffer of good data, zstandard's stops silently)."""
    with open(path, "rb") as raw:
        dobj, fed = new_decompressor(), False
        try:
            # Small reads: a corrupted block loses only what it would have decoded to.
            while block := raw.read(1 << 16):
                while block:
                    if not fed:
                        block = block.lstrip(b"\0")  # zero padding after the last member (gzip allows it)
                        if not block:
                            break
                    fed = True
                    out = dobj.decompress(block)
                    if out:
                        yield out
                    block = b""
                    if dobj.eof:  # a member/frame ended: the rest of the block starts the next one
                        block, dobj, fed = dobj.unused_data, new_decompressor(), False
        except errors as e:
            raise CorruptFileError(f"corrupted {fmt} data ({e})") from None
        if fed and not dobj.eof:
            raise CorruptFileError(f"the {fmt} stream ends early (truncated file?)")


def _gzip_chunks(path: str) -> Iterator[bytes]:
    return _frames(path, lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), "gzip", (zlib.error,))


def _zstd_chunks(path: str) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return _frames(path, dctx.decompressobj, "zstd", (zstandard.ZstdError,))


def _stream_lines(shard: Shard) -> Iterator[bytes]:
    if shard.kind == "jsonl":
        yield from _jsonl_chunk_lines(shard)
    elif shard.kind == "gz":
        yield from io.BufferedReader(_ChunkStream(_gzip_chunks(shard.path)), 1 << 20)
    elif shard.kind == "zst":
        yield from io.BufferedReader(_ChunkStream(_zstd_chunks(shard.path)), 1 << 20)
    else:
        raise ValueError(f"{shard.path}: not a line-based file")


def _corrupt(line: int, error: Exception) -> Reject:
    return Reject(line, "corrupt_file", f"{error}; this line and the rest of the file cannot be read")


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
    lines = _stream_lines(shard)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            break
        except CorruptFileError as e:
            rejects.append(_corrupt(lineno + 1, e))
            break
        lineno += 1
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(shard.path)
        has_key = key in pf.schema_arrow.names
        # Size progress by the file's compressed bytes spread over its rows.
        bytes_per_row = os.path.getsize(shard.path) / max(pf.metadata.num_rows, 1)
        columns = [key] if has_key else [pf.schema_arrow.names[0]]
        batches = pf.iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowException, OSError) as e:
        yield [], [], [_corrupt(1, CorruptFileError(f"unreadable parquet file ({e})"))], 1, 0
        return
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            yield [], [], [_corrupt(row + 1, CorruptFileError(f"corrupted parquet data ({e})"))], 1, 0
            return
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
