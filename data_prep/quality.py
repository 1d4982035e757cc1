"""Corpus quality filters for (continued) pretraining data, as functions and one CLI.

    python -m data_prep.quality --input 'raw/*.jsonl.zst' --output clean.jsonl \\
        [--min-chars 200] [--max-chars 200000] [--min-words N] [--max-words N] \\
        [--exact-dedup] [--near-dedup --threshold 0.8] \\
        [--decontaminate evals/gsm8k.jsonl evals/humaneval.jsonl --ngram 13] [--max-record-bytes 16MiB]

Filters run per record in a fixed order: length, exact duplicate, near duplicate, eval-set
contamination. Kept records are written unchanged (the original JSON line); every removed record
goes to `OUTPUT.removed.jsonl` with file:line and the filter that removed it; `OUTPUT.report.json`
holds the counts and, per eval set, how many documents matched and example n-grams. Records are
read as `data_prep.tokenize` reads them: a line over --max-record-bytes is skipped unread
(`invalid:too_large`), JSON nested too deep is `invalid:too_deep`, a damaged compressed file
keeps what precedes the damage (`invalid:corrupt_file`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from data_prep.readers import (_MISSING, DEFAULT_MAX_RECORD_BYTES, LongLine, Reject, Shard, _parquet_batch_rows,
                                check_text, expand_inputs, file_kind, numbered_lines, parse_line,
                                parse_size)

_WORD = re.compile(r"\w+")


def words(text: str) -> List[str]:
    """Lower-cased word tokens; punctuation and whitespace differences do not matter."""
    return _WORD.findall(text.lower())


def text_digest(text: str, normalize: bool = False) -> bytes:
    """16-byte hash for exact dedup; `normalize` ignores case and whitespace runs."""
    if normalize:
        text = " ".join(text.lower().split())
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDedup:
    """Keeps the first occurrence of each text (by hash)."""

    def __init__(self, normalize: bool = False):
        self.normalize = normalize
        self._seen: Dict[bytes, str] = {}

    def check(self, text: str, where: str) -> Optional[str]:
        """Return where the earlier copy was, or None (and remember this one)."""
        d = text_digest(text, self.normalize)
        if d in self._seen:
            return self._seen[d]
        self._seen[d] = where
        return None


class NearDedup:
    """Near-duplicate removal with MinHash LSH (datasketch) over word shingles.

    A document is dropped when LSH finds an earlier kept document whose estimated Jaccard
    similarity of word `shingle`-grams reaches `threshold`.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.shingle, self.seed, self.threshold = num_perm, shingle, seed, threshold
        self._hashes: Dict[str, object] = {}

    def minhash(self, text: str):
        w = words(text)
        n = min(self.shingle, len(w)) or 1
        grams = {" ".join(w[i:i + n]).encode() for i in range(max(len(w) - n + 1, 1))}
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(grams))
        return m

    def check(self, text: str, where: str) -> Optional[str]:
        """Return where a near-duplicate kept earlier is, or None (and index this one)."""
        m = self.minhash(text)
        for cand in sorted(self.lsh.query(m)):
            # LSH candidates are probabilistic; confirm with the estimated Jaccard.
            if self._hashes[cand].jaccard(m) >= self.threshold:
                return cand
        self.lsh.insert(where, m)
        self._hashes[where] = m
        return None


@dataclass
class EvalHits:
    """Contamination found for one eval set."""

    docs: int = 0
    ngrams: int = 0
    examples: List[str] = field(default_factory=list)


class Decontaminator:
    """Flags documents sharing any word `n`-gram (default 13) with an eval set.

    Eval items shorter than `n` words cannot be matched this way; they are counted in
    `too_short` so the report says what was not checked.
    """

    def __init__(self, eval_sets: Dict[str, Iterable[str]], n: int = 13):
        self.n = n
        self.index: Dict[str, set] = defaultdict(set)
        self.items: Dict[str, int] = {}
        self.too_short: Dict[str, int] = {}
        for name, texts in eval_sets.items():
            self.items[name] = self.too_short[name] = 0
            for text in texts:
                self.items[name] += 1
                w = words(text)
                if len(w) < n:
                    self.too_short[name] += 1
                for i in range(len(w) - n + 1):
                    self.index[" ".join(w[i:i + n])].add(name)
        self.hits: Dict[str, EvalHits] = {name: EvalHits() for name in eval_sets}

    def check(self, text: str) -> Dict[str, List[str]]:
        """Return `{eval_set: [matching n-grams]}` for this document (empty if clean)."""
        w = words(text)
        found: Dict[str, List[str]] = defaultdict(list)
        for i in range(len(w) - self.n + 1):
            gram = " ".join(w[i:i + self.n])
            for name in self.index.get(gram, ()):
                found[name].append(gram)
        for name, grams in found.items():
            h = self.hits[name]
            h.docs += 1
            h.ngrams += len(grams)
            if len(h.examples) < 5:
                h.examples.append(grams[0])
        return dict(found)


def length_reason(text: str, min_chars=0, max_chars=None, min_words=0, max_words=None) -> Optional[str]:
    """Why `text` fails the length filter, or None."""
    if len(text) < min_chars:
        return f"shorter than {min_chars} chars"
    if max_chars is not None and len(text) > max_chars:
        return f"longer than {max_chars} chars"
    if min_words or max_words is not None:
        n = len(words(text))
        if n < min_words:
            return f"fewer than {min_words} words"
        if max_words is not None and n > max_words:
            return f"more than {max_words} words"
    return None


def iter_records(files: Sequence[str], key: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES
                 ) -> Iterator[Tuple[str, int, Optional[str], str, Optional[str]]]:
    """Yield `(file, line, text or None, original JSON line, reject reason)` for every record
    (the line is "" for a record that was not read: too large, or lost to a damaged file)."""
    for path in files:
        kind = file_kind(path)
        for line, text, raw, bad in iter_shard_records(Shard(path, kind, 0, 0, 1 << 62), key, max_bytes):
            yield path, line, text, raw, bad


def iter_shard_records(shard: Shard, key: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES
                       ) -> Iterator[Tuple[int, Optional[str], str, Optional[str]]]:
    """`(line, text or None, original JSON line, reject reason)` for every record of one shard (a
    whole file, or a byte range of a plain .jsonl: lines then count from the range's first line)."""
    if shard.kind == "parquet":
        for _, row, text, raw, bad in _parquet_records(shard.path, key, max_bytes):
            yield row, text, raw, bad
        return
    for line_no, raw in numbered_lines(shard, max_bytes):
        if raw.__class__ is Reject:
            yield line_no, None, "", raw.reason  # corrupt_file: the last item
        elif raw.__class__ is LongLine:
            yield line_no, None, "", "too_large"
        else:
            text, bad = parse_line(raw, key)
            yield line_no, text, raw.decode("utf-8", "replace").rstrip("\r\n"), bad and bad[0]


def _parquet_records(path: str, key: str, max_bytes: int):
    """Parquet rows batch by batch; a text value over `max_bytes` is never converted."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    row_no = 0
    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20)
        for batch in pf.iter_batches(batch_size=_parquet_batch_rows(pf, key, 1024)):
            over = None
            if key in batch.schema.names and pa.types.is_string(batch.schema.field(key).type):
                col = batch.column(key)
                over = pc.greater(pc.fill_null(pc.binary_length(col), 0), max_bytes)
                if pc.any(over).as_py():
                    batch = batch.set_column(batch.schema.get_field_index(key), key,
                                             pc.if_else(over, pa.scalar(None, col.type), col))
                    over = over.to_pylist()
                else:
                    over = None
            for i, row in enumerate(batch.to_pylist()):
                row_no += 1
                if over is not None and over[i]:
                    yield path, row_no, None, "", "too_large"
                    continue
                text, bad = check_text(row.get(key, _MISSING), key)
                yield path, row_no, text, json.dumps(row, ensure_ascii=False, default=str), bad and bad[0]
    except (pa.ArrowException, OSError):
        yield path, row_no + 1, None, "", "corrupt_file"



def read_eval_sets(paths: Sequence[str], keys: Sequence[str]) -> Dict[str, List[str]]:
    """Eval set name (file stem) -> texts; each item's text joins the string fields in `keys`."""
    sets: Dict[str, List[str]] = {}
    for path in expand_inputs(paths):
        name = Path(path).name.split(".")[0]
        texts = []
        for _, line, _, raw, bad in iter_records([path], keys[0]):
            if bad in ("too_large", "too_deep", "corrupt_file"):
                raise ValueError(f"{path}:{line}: eval set record is unreadable ({bad})")
            try:
                obj = json.loads(raw)
            except ValueError:
                raise ValueError(f"{path}:{line}: eval set line is not JSON") from None
            parts = [obj[k] for k in keys if isinstance(obj, dict) and isinstance(obj.get(k), str)]
            if not parts:
                raise ValueError(f"{path}:{line}: none of the fields {list(keys)} holds a string")
            texts.append("\n".join(parts))
        sets[name] = texts
    return sets


@dataclass
class FilterConfig:
    """Which filters run; None/0/False disables one."""

    text_key: str = "text"
    min_chars: int = 0
    max_chars: Optional[int] = None
    min_words: int = 0
    max_words: Optional[int] = None
    exact_dedup: bool = False
    normalize: bool = False
    near_dedup: bool = False
    threshold: float = 0.8
    num_perm: int = 128
    eval_sets: Dict[str, List[str]] = field(default_factory=dict)
    ngram: int = 13
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


def run_filters(files: Sequence[str], output: str, cfg: FilterConfig) -> dict:
    """Filter `files` into `output` (JSONL); write the removed list and the report; return the report."""
    exact = ExactDedup(cfg.normalize) if cfg.exact_dedup else None
    near = NearDedup(cfg.threshold, cfg.num_perm) if cfg.near_dedup else None
    decon = Decontaminator(cfg.eval_sets, cfg.ngram) if cfg.eval_sets else None
    counts = defaultdict(int)
    out_tmp, rem_tmp = Path(output + ".tmp"), Path(output + ".removed.jsonl.tmp")
    with open(out_tmp, "w", encoding="utf-8") as out, open(rem_tmp, "w", encoding="utf-8") as removed:
        for path, line, text, raw, bad in iter_records(files, cfg.text_key, cfg.max_record_bytes):
            counts["records"] += 1
            where = f"{path}:{line}"
            reason, detail = _first_failure(text, bad, where, cfg, exact, near, decon)
            if reason is None:
                out.write(raw + "\n")
                counts["kept"] += 1
                continue
            counts[reason] += 1
            removed.write(json.dumps({"file": path, "line": line, "filter": reason, "detail": detail}) + "\n")
    out_tmp.replace(output)
    rem_tmp.replace(output + ".removed.jsonl")
    report = {"counts": dict(counts)}
    if decon:
        report["decontamination"] = {
            name: {"eval_items": decon.items[name], "eval_items_too_short": decon.too_short[name],
                   "docs_hit": h.docs, "ngram_hits": h.ngrams, "examples": h.examples, "n": cfg.ngram}
            for name, h in decon.hits.items()}
    with open(output + ".report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def _first_failure(text, bad, where, cfg: FilterConfig, exact, near, decon) -> Tuple[Optional[str], str]:
    """The first filter a record fails, in the documented order, with a detail string."""
    if bad:
        return "invalid:" + bad, "unusable record"
    why = length_reason(text, cfg.min_chars, cfg.max_chars, cfg.min_words, cfg.max_words)
    if why:
        return "length", why
    if exact and (first := exact.check(text, where)):
        return "exact_dup", f"same text as {first}"
    if near and (first := near.check(text, where)):
        return "near_dup", f"near-duplicate of {first}"
    if decon and (found := decon.check(text)):
        return "contaminated", "; ".join(f"{k}: {len(v)} {cfg.ngram}-grams" for k, v in sorted(found.items()))
    return None, ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.quality", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--output", required=True, help="kept records (JSONL)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--min-chars", type=int, default=0)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--min-words", type=int, default=0)
    p.add_argument("--max-words", type=int)
    p.add_argument("--exact-dedup", action="store_true")
    p.add_argument("--normalize", action="store_true", help="exact dedup ignores case and whitespace runs")
    p.add_argument("--near-dedup", action="store_true", help="MinHash LSH near-duplicate removal")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold for --near-dedup")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--decontaminate", nargs="+", default=[], help="eval set files (JSONL/parquet)")
    p.add_argument("--eval-key", action="append", help="eval text field(s); default: text")
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--max-record-bytes", type=parse_size, default=DEFAULT_MAX_RECORD_BYTES, metavar="SIZE",
                   help="longest record read (default 16MiB); a longer one is skipped unread as invalid:too_large")
    a = p.parse_args(argv)
    try:
        files = expand_inputs(a.input)
        evals = read_eval_sets(a.decontaminate, a.eval_key or ["text"]) if a.decontaminate else {}
        cfg = FilterConfig(a.text_key, a.min_chars, a.max_chars, a.min_words, a.max_words, a.exact_dedup,
                           a.normalize, a.near_dedup, a.threshold, a.num_perm, evals, a.ngram, a.max_record_bytes)
        report = run_filters(files, a.output, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
