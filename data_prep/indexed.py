"""Megatron-Core indexed dataset files (`.bin` + `.idx`), written atomically.

The byte layout is Megatron-Core's `IndexedDataset` format (megatron-core 0.16.1,
`megatron/core/datasets/indexed_dataset.py`): the `.idx` holds a 9-byte magic, version 1, a dtype
code, the sequence and document counts, int32 sequence lengths, int64 byte pointers and int64
document indices; the `.bin` holds the tokens back to back. We write it ourselves rather than
through `IndexedDatasetBuilder` so that workers never import torch and so every file is written
to a temporary name and renamed only when complete. Tests read the result with Megatron's reader.

Token dtype: Megatron's `DType.optimal_dtype(vocab_size)` gives uint16 below 65500 and int32
otherwise (the format has no uint32 code), so Qwen's 151k vocabulary is stored as int32, exactly
as Megatron-LM's `preprocess_data.py` writes it.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import List, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron-Core's DType codes (the enum's values) for the dtypes we may write.
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
CODE_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Same rule as megatron.core.datasets.indexed_dataset.DType.optimal_dtype."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def tmp_path(path: str | Path) -> Path:
    """The temporary name a file is written under before its atomic rename."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


class UnwritableOutputError(ValueError):
    """An output location cannot be written; the message names the directory and why."""


def check_writable_dir(path: str | Path, what: str = "output") -> Path:
    """Create directory `path` (with its parents) if needed and prove a file can be written in it,
    before any work starts: an unwritable output should fail in a second with its name, not after
    hours of work with a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        detail = e.strerror or str(e)
        if e.filename and Path(e.filename) != path:
            detail += f": {e.filename}"
        raise UnwritableOutputError(f"{path}: cannot write the {what} there ({detail})") from None
    return path


def fsync_rename(src: Path, dst: Path) -> None:
    """Flush `src` to disk, then rename it over `dst` (atomic on POSIX file systems)."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray) -> None:
    """Write a Megatron `.idx` for one-sequence-per-document data with these lengths."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_index = np.arange(n + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_index.tobytes(order="C"))


class IndexedWriter:
    """Writes documents to `prefix.bin.tmp`, then publishes `prefix.bin` and `prefix.idx`.

    `commit()` renames the `.bin` first and the `.idx` last, so an `.idx` only ever appears next to
    a complete `.bin`; a crash before that leaves only `.tmp` files, which a rerun overwrites.
    """

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.dtype = optimal_dtype(vocab_size)
        self._max_id = np.iinfo(self.dtype).max
        self.bin_tmp = tmp_path(self.prefix.with_name(self.prefix.name + ".bin"))
        self._bin = open(self.bin_tmp, "wb")
        self.lengths: List[int] = []
        self.tokens = 0

    def add_packed(self, data: bytes, lengths: np.ndarray) -> None:
        """Append documents given as one native-endian uint32 buffer of all their ids and each
        one's token count (a tokenizer's `encode_packed`): one range check and one write."""
        if not len(lengths):
            return
        total = int(lengths.sum())
        if len(data) != 4 * total:
            raise ValueError(f"{self.prefix}: {len(data)} bytes of ids for {total} tokens (want uint32)")
        if lengths.min() <= 0:
            raise ValueError(f"{self.prefix}: refusing to write a zero-token document")
        flat = np.frombuffer(data, dtype=np.uint32)
        if int(flat.max()) > self._max_id:
            raise ValueError(f"{self.prefix}: token id out of range for {self.dtype}")
        # ids below 2**31 have the same bytes in uint32 and int32: no copy for int32 files.
        self._bin.write(flat.view(np.int32) if self.dtype == np.int32 else flat.astype(self.dtype))
        self.lengths.extend(lengths.tolist())
        self.tokens += total

    def commit(self) -> None:
        """Publish the files: `.bin` renamed first, `.idx` last."""
        self._bin.close()
        idx_tmp = tmp_path(self.prefix.with_name(self.prefix.name + ".idx"))
        write_index(idx_tmp, self.dtype, np.asarray(self.lengths, dtype=np.int32))
        fsync_rename(self.bin_tmp, bin_path(self.prefix))
        fsync_rename(idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        self.bin_tmp.unlink(missing_ok=True)


def bin_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".idx")


class IndexedReader:
    """A small torch-free reader of the same format (for `inspect`, merging and blending)."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing (indexed dataset prefix {prefix})")
        with open(ipath, "rb") as f:
            head = f.read(34)
        if len(head) < 34 or head[:9] != INDEX_HEADER:
            raise ValueError(f"{ipath}: not a Megatron indexed dataset index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
        if version != 1 or code not in CODE_DTYPES:
            raise ValueError(f"{ipath}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(CODE_DTYPES[code])
        idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=34)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=34 + 4 * n_seq)
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc, offset=34 + 12 * n_seq)
        expected = int(self.lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bpath.stat().st_size != expected:
            raise ValueError(f"{bpath}: {bpath.stat().st_size} bytes, index expects {expected}")
        self._bin = np.memmap(bpath, mode="r", dtype=self.dtype) if expected else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start:start + int(self.lengths[i])])


    def last_tokens(self) -> np.ndarray:
        """The last token of every (non-empty) document, gathered without a Python loop."""
        nonempty = self.lengths > 0
        ends = self.pointers[nonempty] // self.dtype.itemsize + self.lengths[nonempty] - 1
        return np.asarray(self._bin[ends])


def append_file(src: Path, out) -> None:
    """Append file `src` to the open binary file `out`: copied by the kernel where it can
    (copy_file_range; a reflink on filesystems that have them), else through a buffer."""
    out.flush()
    with open(src, "rb") as f:
        left = os.fstat(f.fileno()).st_size
        try:
            while left > 0:
                n = os.copy_file_range(f.fileno(), out.fileno(), left)
                if n == 0:
                    break
                left -= n
        except (AttributeError, OSError):  # no copy_file_range here (platform, kernel, filesystem)
            pass
        if left > 0:  # the kernel moved both file offsets past what it copied: go on from there
            shutil.copyfileobj(f, out, 1 << 20)


def merge(prefixes: Sequence[Path], out_prefix: Path, vocab_size: int) -> tuple[int, int]:
    """Concatenate shard datasets, in order, into `out_prefix` (atomically). Returns (docs, tokens).

    Any old `out_prefix.idx` is removed before the new `.bin` is moved in, so a crash in between
    never pairs an old index with new data.
    """
    dtype = optimal_dtype(vocab_size)
    out_prefix = Path(out_prefix)
    bin_tmp = tmp_path(bin_path(out_prefix))
    lengths = []
    with open(bin_tmp, "wb") as out:
        for p in prefixes:
            r = IndexedReader(p)
            if r.dtype != dtype:
                raise ValueError(f"{p}: dtype {r.dtype} differs from {dtype}")
            lengths.append(np.array(r.lengths))
            append_file(bin_path(p), out)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    idx_tmp = tmp_path(idx_path(out_prefix))
    write_index(idx_tmp, dtype, all_lengths)
    idx_path(out_prefix).unlink(missing_ok=True)
    fsync_rename(bin_tmp, bin_path(out_prefix))
    fsync_rename(idx_tmp, idx_path(out_prefix))
    return len(all_lengths), int(all_lengths.sum(dtype=np.int64))


def _merge_inputs(inputs: Sequence[str]) -> List[Path]:
    """Prefixes from the arguments: a prefix, a `.bin`/`.idx` file, or a directory (its `*.idx`, sorted)."""
    out: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q.with_suffix("") for q in p.glob("*.idx"))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no .idx file")
            out += found
        else:
            out.append(p.with_suffix("") if p.suffix in (".bin", ".idx") else p)
    return out


def main(argv=None) -> int:
    """`python -m data_prep.indexed merge --output PREFIX IN...`: concatenate indexed datasets, in
    the order given (a directory: its prefixes in name order), into PREFIX.bin/.idx."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m data_prep.indexed", description=main.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="concatenate datasets into one")
    m.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    m.add_argument("inputs", nargs="+", help="dataset prefixes or directories of them, in order")
    a = p.parse_args(argv)
    try:
        prefixes = _merge_inputs(a.inputs)
        first = IndexedReader(prefixes[0]).dtype
        vocab = 1 if first == np.dtype(np.uint16) else 1 << 17  # what optimal_dtype maps to this dtype
        check_writable_dir(Path(a.output).absolute().parent, "merged dataset")
        docs, tokens = merge(prefixes, Path(a.output), vocab)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.output}.bin / .idx: {docs:,} docs, {tokens:,} tokens from {len(prefixes)} datasets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
