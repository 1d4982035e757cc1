"""Reading documents from `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet`, with validation.

Every input record either yields a document text or a `Reject` with a reason and a 1-based
line number (row number for parquet) relative to the start of its shard. Plain `.jsonl` files
are split into byte-range chunks so one large file still spreads over several workers; a chunk
owns every line that *starts* inside its byte range, so chunks partition the lines exactly.

A compressed or parquet file that ends early or is corrupted gives every record read before the
damage, then one `corrupt_file` reject at the first line it could not read (that line and the
rest of the file are lost); the other files are unaffected.

Nothing a file holds can make reading it take memory out of proportion: a line longer than
`max_bytes` (DEFAULT_MAX_RECORD_BYTES) is skipped in bounded reads up to its newline and becomes a
`too_large` reject, compressed input is decoded in bounded steps (a gzip or zstd bomb never
exists whole in memory), a JSON record nested deeper than MAX_JSON_DEPTH is a `too_deep` reject
found by a scan that does not recurse, and a batch holds about BATCH_BYTES of records. Memory is
then set by `max_bytes` (`data_prep.tokenize` takes about 6x a record's size to tokenize it;
json.loads of a record made of many tiny arrays/objects up to ~25x), never by the input, plus a
zstd frame's window (up to 128 MiB, zstd's own decoding limit, for files compressed with --long
or --ultra).

Readers of other jsonl inputs (post-training data, eval task files, synthesis task lists) use
`iter_json_lines` / `read_json_lines`: the same bounded line reader and checks for one file.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from orjson import JSONDecodeError as _OrjsonError
from orjson import loads as _orjson_loads

# Reasons a record is skipped, in the order the summary reports them.
REASONS = ("blank_line", "invalid_utf8", "malformed_json", "missing_key", "not_string", "empty_text", "corrupt_file",
           "too_large", "too_deep")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "gz", ".json.gz": "gz",
            ".jsonl.zst": "zst", ".json.zst": "zst", ".parquet": "parquet"}

# The largest record (a line without its newline; a parquet text value) that is read. 16 MiB is
# about 4M tokens, four times the longest context a Qwen model is trained on and far above any
# real document (a long book is a few MB), while the memory to tokenize one (about 6x its size in
# data_prep.tokenize: the text, the tokenizer's work, the ids as uint32) stays near 100 MB per
# worker. A longer line is skipped in bounded reads and listed as `too_large`.
DEFAULT_MAX_RECORD_BYTES = 16 << 20
# JSON records nested deeper are rejected before json.loads, which recurses once per level
# (Python's limit is ~1000); real records (chat messages, content parts) need fewer than 10.
MAX_JSON_DEPTH = 100
# Records up to this size are parsed by orjson first (see parse_line).
FAST_JSON_BYTES = 1 << 20
# A batch is handed on once its records hold this many bytes (or `batch_size` records).
BATCH_BYTES = 8 << 20
# Bounded reads: decompressed bytes per step, and the step that skips through a long line.
_OUT_STEP = 1 << 20
# zstd input per decoder call. zstd expands at most ~32,000x (a 4-byte RLE block decodes to
# 128 KiB), so one call never yields more than ~4 MiB, even for a bomb.
_ZSTD_FEED = 128


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


class LongLine:
    """Stands for a line longer than the record limit, skipped without being held (what the
    line reader yields instead of its bytes): `len()` is the bytes it took up, newline
    included, `record` its size without the newline."""

    __slots__ = ("size", "record")

    def __init__(self, size: int, newline: bool):
        self.size, self.record = size, size - newline

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"LongLine({self.size})"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """A size on the command line: '16MiB' -> 16777216, '1GB' -> 10**9, '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS or int(float(m.group(1)) * _UNITS[unit]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 16MiB, 1GB or 500000")
    return int(float(m.group(1)) * _UNITS[unit])


def too_large(size: int, max_bytes: int, limit: str = "--max-record-bytes") -> Tuple[str, str]:
    return "too_large", f"record is {size:,} bytes > {limit} {max_bytes:,}; skipped unread"


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


def _skip_line(f, limit: int = 1 << 62) -> Tuple[int, bool]:
    """Read past the rest of the current line (at most `limit` bytes) in bounded steps; return
    the bytes consumed and whether they end with a newline (else the file or `limit` ended)."""
    n = 0
    while n < limit and (chunk := f.readline(min(_OUT_STEP, limit - n))):
        n += len(chunk)
        if chunk[-1:] == b"\n":
            return n, True
    return n, False


def _bounded_lines(f, max_bytes: int) -> Iterator:
    """The lines of binary stream `f` (newline included), each read with at most
    `max_bytes` + 1 bytes held; a longer line is skipped and yielded as a `LongLine`."""
    readline, cap = f.readline, max_bytes + 1
    while line := readline(cap):
        if len(line) == cap and line[-1:] != b"\n":
            n = len(line)
            del line
            rest, newline = _skip_line(f)
            yield LongLine(n + rest, newline)
        else:
            yield line


def _jsonl_chunk_lines(shard: Shard, max_bytes: int) -> Iterator:
    with open(shard.path, "rb", buffering=1 << 20) as f:
        pos = shard.start
        if pos > 0:
            # The line that straddles `start` belongs to the previous chunk: skip to its end,
            # reading no further than this chunk (a line that runs past it leaves it no line).
            f.seek(pos - 1)
            skipped, newline = _skip_line(f, shard.end - pos)
            if not newline:
                return
            pos += skipped - 1
        readline, cap, end = f.readline, max_bytes + 1, shard.end
        while pos < end and (line := readline(cap)):  # as _bounded_lines, inlined: once per line
            if len(line) == cap and line[-1:] != b"\n":
                n = len(line)
                del line
                rest, newline = _skip_line(f)
                line = LongLine(n + rest, newline)
            pos += len(line)
            yield line


class _ChunkStream(io.RawIOBase):
    """A readable raw stream over an iterator of byte chunks (for BufferedReader's readline)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buf, self._pos, self._error = chunks, b"", 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        # Fill `b` from as many chunks as it takes (small chunks: few calls from BufferedReader);
        # an error comes after the bytes before it were returned.
        if self._error is not None:
            raise self._error
        size, done = len(b), 0
        while done < size:
            if self._pos >= len(self._buf):
                try:
                    self._buf, self._pos = next(self._chunks, None), 0
                except Exception as e:
                    if not done:
                        raise
                    self._buf, self._error = b"", e
                    break
                if self._buf is None:
                    self._buf = b""
                    break
                continue
            n = min(size - done, len(self._buf) - self._pos)
            b[done:done + n] = memoryview(self._buf)[self._pos:self._pos + n]
            self._pos += n
            done += n
        return done


def _frames(path: str, new_decompressor, step, fmt: str, errors: tuple) -> Iterator[bytes]:
    """Decompressed bytes of a file of concatenated gzip members / zstd frames, yielded as they
    are decoded, in pieces of about _OUT_STEP whatever the compression ratio; damage raises
    CorruptFileError only after everything before it was yielded (the gzip module's reader drops
    up to a buffer of good data, zstandard's stops silently).

    `step(dobj, data)` decodes a bounded amount of `data` and returns `(outs, rest, more)`: a
    list of output pieces, the input still to feed (after the end of a member/frame: what follows
    it) and whether the decoder holds more output without more input."""
    with open(path, "rb") as raw:
        dobj, fed = new_decompressor(), False
        try:
            # Small reads: a corrupted block loses only what it would have decoded to.
            while block := raw.read(1 << 16):
                while True:
                    if not fed:
                        block = block.lstrip(b"\0")  # zero padding after the last member (gzip allows it)
                        if not block:
                            break
                    fed = True
                    outs, block, more = step(dobj, block)
                    yield from outs
                    if dobj.eof:  # a member/frame ended: the rest of the block starts the next one
                        dobj, fed, more = new_decompressor(), False, False
                    if not block and not more:
                        break
        except errors as e:
            raise CorruptFileError(f"corrupted {fmt} data ({e})") from None
        if fed and not dobj.eof:
            raise CorruptFileError(f"the {fmt} stream ends early (truncated file?)")


def _gzip_step(dobj, data):
    out = dobj.decompress(data, _OUT_STEP)
    if dobj.eof:
        return [out], dobj.unused_data, False
    return [out], dobj.unconsumed_tail, len(out) == _OUT_STEP


def _zstd_step(dobj, data):
    # zstandard's decompressobj returns all the output of what it is fed, so feed it in slices;
    # small outputs are joined into one piece, a large one is passed on as it is (no copy).
    outs, n, pos, size = [], 0, 0, len(data)
    while pos < size and n < _OUT_STEP and not dobj.eof:
        out = dobj.decompress(data[pos:pos + _ZSTD_FEED])
        pos += _ZSTD_FEED
        if len(out) >= _OUT_STEP // 2:
            outs = [b"".join(outs), out] if outs else [out]
            break
        if out:
            outs.append(out)
            n += len(out)
    else:
        outs = [b"".join(outs)]
    return outs, (dobj.unused_data if dobj.eof else b"") + data[pos:], False


def _gzip_chunks(path: str) -> Iterator[bytes]:
    return _frames(path, lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), _gzip_step, "gzip", (zlib.error,))


def _zstd_chunks(path: str) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return _frames(path, dctx.decompressobj, _zstd_step, "zstd", (zstandard.ZstdError,))


def _stream_lines(shard: Shard, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator:
    """A shard's lines (bytes, newline included), a line over `max_bytes` as a `LongLine`."""
    if shard.kind == "jsonl":
        return _jsonl_chunk_lines(shard, max_bytes)
    if shard.kind == "gz":
        return _bounded_lines(io.BufferedReader(_ChunkStream(_gzip_chunks(shard.path)), 1 << 20), max_bytes)
    if shard.kind == "zst":
        return _bounded_lines(io.BufferedReader(_ChunkStream(_zstd_chunks(shard.path)), 1 << 20), max_bytes)
    raise ValueError(f"{shard.path}: not a line-based file")


def numbered_lines(shard: Shard, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Tuple[int, object]]:
    """`(line number, line)` for each line of a line-based shard, numbered from 1: its bytes
    (newline included), a `LongLine` for one over `max_bytes`, and, where damaged compressed
    data ends the file, a `corrupt_file` Reject as the last item."""
    lineno = 0
    try:
        for raw in _stream_lines(shard, max_bytes):
            lineno += 1
            yield lineno, raw
    except CorruptFileError as e:
        yield lineno + 1, _corrupt(lineno + 1, e)


def _corrupt(line: int, error: Exception) -> Reject:
    return Reject(line, "corrupt_file", f"{error}; this line and the rest of the file cannot be read")


def parse_json(raw: bytes) -> Tuple[object, Optional[Tuple[str, str]]]:
    """Return `(value, None)` for a line holding one JSON value or `(None, (reason, detail))`:
    blank_line, invalid_utf8, too_deep (found before json.loads, which recurses) or malformed_json."""
    if not raw.strip():
        return None, ("blank_line", "line is empty")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, ("invalid_utf8", f"invalid UTF-8 byte at offset {e.start}: {raw[e.start:e.start + 4]!r}")
    # Nesting can only reach the opening brackets there are: count them (fast), and only when
    # there are many, measure the depth outside strings.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return None, ("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(line), None
    except (ValueError, RecursionError) as e:
        return None, ("malformed_json", str(e) or type(e).__name__)


def _fast_text(raw: bytes, key: str) -> Optional[str]:
    """The record's usable text as orjson reads it, or None where `parse_line` must decide."""
    if len(raw) > FAST_JSON_BYTES:
        return None
    try:
        obj = _orjson_loads(raw)
    except _OrjsonError:
        return None
    text = obj.get(key) if obj.__class__ is dict else None
    if text.__class__ is str and text and not text.isspace() and (
            raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH or nesting(obj, MAX_JSON_DEPTH) <= MAX_JSON_DEPTH):
        return text
    return None


def parse_line(raw: bytes, key: str) -> Tuple[Optional[str], Optional[Tuple[str, str]]]:
    """Return `(text, None)` for a usable record or `(None, (reason, detail))`.

    A record is read by orjson first (3-4x faster than the standard library; it refuses invalid
    UTF-8 and lone surrogates itself, and nesting past 1024 levels without recursing) and a
    usable text within MAX_JSON_DEPTH is returned at once; anything else is read again below, so
    every reject and its reason is the standard library's, as before. The two parsers agree on
    every string, so the fast path never returns another text. Records over FAST_JSON_BYTES skip
    it: they gain nothing from it, and orjson holds up to 1.5x json's memory while it builds a
    record of many tiny arrays (38x the line against 25x)."""
    text = _fast_text(raw, key)
    if text is not None:
        return text, None
    obj, bad = parse_json(raw)
    if bad is not None:
        return None, bad
    if not isinstance(obj, dict):
        return None, ("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    return check_text(obj.get(key, _MISSING), key, escaped=b"\\u" in raw or b"\\U" in raw)


def _line_kind(path: str) -> str:
    """How to read a line-based file: by its compression suffix, else as plain jsonl (any name)."""
    name = path.lower()
    if name.endswith(".gz"):
        return "gz"
    if name.endswith(".zst"):
        return "zst"
    if name.endswith(".parquet"):
        raise ValueError(f"{path}: a parquet file is not jsonl")
    return "jsonl"


def iter_json_lines(path, max_bytes: Optional[int] = None) -> Iterator[Tuple[int, object]]:
    """`(line number, value)` for each line of one jsonl file (gzip/zstd by a `.gz`/`.zst` suffix,
    anything else read as plain jsonl): the line's JSON value, or a `Reject` (blank_line,
    invalid_utf8, malformed_json, too_deep, too_large; corrupt_file last, where damaged
    compressed data ends the file). Read as `data_prep.tokenize` reads its input: a line longer
    than `max_bytes` (None: DEFAULT_MAX_RECORD_BYTES, 16 MiB) is skipped unread, compressed data is
    decoded in bounded steps, nesting deeper than MAX_JSON_DEPTH is refused before json.loads, so
    memory is set by `max_bytes`, never by the file."""
    path = str(path)
    max_bytes = DEFAULT_MAX_RECORD_BYTES if max_bytes is None else max_bytes
    for lineno, raw in numbered_lines(Shard(path, _line_kind(path), 0, 0, 1 << 62), max_bytes):
        if raw.__class__ is Reject:
            yield lineno, raw
        elif raw.__class__ is LongLine:
            yield lineno, Reject(lineno, *too_large(raw.record, max_bytes, "the record limit"))
        else:
            value, bad = parse_json(raw)
            yield lineno, (value if bad is None else Reject(lineno, *bad))


def read_json_lines(path, max_bytes: Optional[int] = None) -> Iterator[Tuple[int, dict]]:
    """`(line number, object)` for each non-blank line of one jsonl file, read by `iter_json_lines`
    (the same limits); a line that is not a JSON object raises ValueError
    "PATH:LINE: REASON: DETAIL" (a reason of REASONS) when it is reached."""
    for lineno, value in iter_json_lines(path, max_bytes):
        if value.__class__ is Reject:
            if value.reason == "blank_line":
                continue
            raise ValueError(f"{path}:{lineno}: {value.reason}: {value.detail}")
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{lineno}: malformed_json: expected a JSON object, got {type(value).__name__}")
        yield lineno, value


# A JSON string (an unterminated one runs to the end), and the bytes that open/close nesting.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.S)
_NESTING = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_NESTING = bytes(sorted(set(range(256)) - set(b"[{]}")))


def json_depth(raw: bytes, stop: int = 1 << 62) -> int:
    """Deepest nesting of `raw`'s brackets outside JSON strings, without recursion; it stops
    counting once past `stop`. For any line it is at least the depth `json.loads` would reach
    before it finished or failed (both read strings the same way up to the first error)."""
    import numpy as np

    steps = _JSON_STRING.sub(b"", raw).translate(_NESTING, _NOT_NESTING)  # +1 / -1 per bracket
    depth, deepest = 0, 0
    for start in range(0, len(steps), 1 << 20):
        run = np.cumsum(np.frombuffer(steps, np.int8, min(1 << 20, len(steps) - start), start), dtype=np.int64)
        if len(run):
            deepest = max(deepest, depth + int(run.max()))
            depth += int(run[-1])
        if deepest > stop:
            break
    return deepest


def nesting(value, stop: int = 1 << 62) -> int:
    """How deep lists and dicts nest in a parsed JSON value (a scalar: 0), level by level
    without recursion, counted no further than `stop` + 1. For a valid JSON line it equals
    `json_depth` of the line."""
    depth, level = 0, [value]
    while depth <= stop:
        containers = [v for v in level if v.__class__ is dict or v.__class__ is list]
        if not containers:
            break
        depth += 1
        level = [x for c in containers for x in (c.values() if c.__class__ is dict else c)]
    return depth


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


def iter_batches(shard: Shard, key: str, batch_size: int = 1024,
                 max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Batch]:
    """Yield `(line_numbers, texts, rejects, lines_read, bytes_read)` batches for a shard; a
    batch ends after `batch_size` records or BATCH_BYTES of them, whichever comes first."""
    if shard.kind == "parquet":
        yield from _parquet_batches(shard, key, batch_size, max_bytes)
        return
    nums, texts, rejects, nbytes = [], [], [], 0
    for lineno, raw in numbered_lines(shard, max_bytes):
        if raw.__class__ is Reject:  # corrupt_file: the last item
            rejects.append(raw)
            break
        nbytes += len(raw)
        if raw.__class__ is LongLine:
            text, bad = None, too_large(raw.record, max_bytes)
        else:
            text, bad = parse_line(raw, key)
        if bad is None:
            nums.append(lineno)
            texts.append(text)
        else:
            rejects.append(Reject(lineno, *bad))
        if len(nums) + len(rejects) >= batch_size or nbytes >= BATCH_BYTES:
            yield nums, texts, rejects, len(nums) + len(rejects), nbytes
            nums, texts, rejects, nbytes = [], [], [], 0
    if nums or rejects or nbytes:
        yield nums, texts, rejects, len(nums) + len(rejects), nbytes


def _parquet_batches(shard: Shard, key: str, batch_size: int, max_bytes: int) -> Iterator[Batch]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    row = 0
    try:
        # buffer_size: column chunks are read in 1 MiB pieces rather than whole.
        pf = pq.ParquetFile(shard.path, buffer_size=1 << 20)
        has_key = key in pf.schema_arrow.names
        # Size progress by the file's compressed bytes spread over its rows.
        bytes_per_row = os.path.getsize(shard.path) / max(pf.metadata.num_rows, 1)
        columns = [key] if has_key else [pf.schema_arrow.names[0]]
        batches = pf.iter_batches(batch_size=_parquet_batch_rows(pf, columns[0], batch_size), columns=columns)
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
        column, sizes = batch.column(0), None
        if has_key and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            if len(column) and pc.max(lengths).as_py() > max_bytes:  # oversize values never become str
                over = pc.greater(lengths, max_bytes)
                column, sizes = pc.if_else(over, pa.scalar(None, column.type), column), lengths.to_numpy()
        values = column.to_pylist() if has_key else [_MISSING] * batch.num_rows
        nums, texts, rejects = [], [], []
        for i, v in enumerate(values):
            row += 1
            if sizes is not None and sizes[i] > max_bytes:
                text, bad = None, too_large(int(sizes[i]), max_bytes)
            else:
                text, bad = check_text(v, key, escaped=False)
            if bad is None:
                nums.append(row)
                texts.append(text)
            else:
                rejects.append(Reject(row, *bad))
        yield nums, texts, rejects, len(values), int(len(values) * bytes_per_row)


def _parquet_batch_rows(pf, column: str, batch_size: int) -> int:
    """Rows per batch: `batch_size`, fewer where the column's row groups hold large values, so
    a batch is about BATCH_BYTES (by the file's own size records)."""
    meta = pf.metadata
    leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path == column]
    if not leaves:  # a nested column: keep the default
        return batch_size
    per_row = max((meta.row_group(i).column(leaves[0]).total_uncompressed_size / max(meta.row_group(i).num_rows, 1)
                   for i in range(meta.num_row_groups)), default=0)
    return int(max(1, min(batch_size, BATCH_BYTES // max(per_row, 1))))


def count_lines_before(shard: Shard) -> int:
    """Number of lines in the file before this chunk's first line (for absolute line numbers)."""
    if shard.kind != "jsonl" or shard.start == 0:
        return 0
    count = 0
    with open(shard.path, "rb") as f:
        f.seek(shard.start - 1)
        first = shard.start - 1 + _skip_line(f)[0]  # offset of the chunk's first line
        f.seek(0)
        remaining = first
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count
