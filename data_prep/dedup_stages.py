"""The datatrove blocks of `data_prep.dedup` (see its docstring for the stages).

Work files live under DIR/work/: `plan.json` (shards and settings), per shard `sig/S.sig` (uint32
signatures) and `sig/S.keys` (uint64 document keys, ascending), `pre/S.jsonl` (records removed
before dedup), `stats/S.json` (written last: the shard is done), sorted key runs
`runs/{exact,near}/PARTITION/S.RUN.bin`, links `edges/PARTITION.bin`, and `clusters/S.bin`
(the shard's removed documents). A document's key is `shard << 32 | line` (line within the shard),
so keys, and the first document of every duplicate group, do not depend on the task count.
"""

from __future__ import annotations

import gzip
import heapq
import json
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
from datatrove.pipeline.base import PipelineStep

from data_prep.minhash import MinHasher, band_keys, estimated_jaccard
from data_prep.quality import Decontaminator, iter_shard_records, read_eval_sets, text_digest
from data_prep.readers import DEFAULT_MAX_RECORD_BYTES, Shard, count_lines_before

REC = np.dtype([("key", "<u8"), ("doc", "<u8")])
EDGE = np.dtype([("doc", "<u8"), ("dup", "<u8"), ("kind", "u1")])
KINDS = ("exact_dup", "near_dup")
_BATCH = 512
_READ = 4096  # records read from a run file at a time
_FAN_IN = 64  # run files merged at once; more are first merged in groups into longer runs



@dataclass
class DedupConfig:
    """Everything that changes the result; stored in DIR/work/plan.json."""

    text_key: str = "text"
    exact: bool = True
    normalize: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    bands: int = 20
    rows: int = 6
    shingle: int = 5
    seed: int = 1
    bucket_compare: int = 8
    eval_files: List[str] = field(default_factory=list)
    eval_keys: List[str] = field(default_factory=lambda: ["text"])
    ngram: int = 13
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    chunk_mb: float = 256.0
    compression: str = "none"
    buffer_records: int = 1 << 21

    def check(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold {self.threshold}: must be in (0, 1]")
        if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
            raise ValueError(f"--bands {self.bands} x --rows {self.rows} must be >= 1 and use at most "
                             f"--num-perm {self.num_perm} permutations")
        if self.compression not in ("none", "gz", "zst"):
            raise ValueError(f"--compression {self.compression!r}: expected none, gz or zst")
        if self.bucket_compare < 1 or self.buffer_records < 1:
            raise ValueError("--bucket-compare and --buffer-records must be >= 1")


STAGES = ("signatures", "buckets", "clusters", "filter", "summary")


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj) -> None:
    _atomic_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


class _Stage(PipelineStep):
    type = "dedup"

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    @property
    def work(self) -> Path:
        return Path(self.out) / "work"

    def plan(self) -> dict:
        if getattr(self, "_plan", None) is None:
            self._plan = json.loads((self.work / "plan.json").read_text())
        return self._plan

    def cfg(self):
        return DedupConfig(**self.plan()["config"])

    def shard(self, i: int) -> Shard:
        return Shard(**self.plan()["shards"][i])

    def my_shards(self, rank: int, world_size: int) -> List[int]:
        return [i for i in range(len(self.plan()["shards"])) if i % world_size == rank]


class _RunBuffer:
    """Band/exact keys of a shard, sorted and spilled per partition every `limit` records."""

    def __init__(self, work: Path, shard: int, partitions: int, limit: int):
        self.work, self.shard, self.partitions, self.limit = work, shard, partitions, limit
        self.parts: Dict[str, list] = {"exact": [], "near": []}
        self.size, self.runs = 0, 0

    def add(self, kind: str, keys: np.ndarray, docs: np.ndarray) -> None:
        rec = np.empty(keys.size, REC)
        rec["key"], rec["doc"] = keys.ravel(), np.repeat(docs, keys.size // max(len(docs), 1))
        self.parts[kind].append(rec)
        self.size += rec.size
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        for kind, parts in self.parts.items():
            if not parts:
                continue
            rec = np.concatenate(parts)
            rec = rec[np.lexsort((rec["doc"], rec["key"]))]
            part = rec["key"] % np.uint64(self.partitions)
            for p in np.unique(part):
                name = self.work / "runs" / kind / f"{int(p):05d}" / f"{self.shard:05d}.{self.runs:04d}.bin"
                _atomic_bytes(name, rec[part == p].tobytes())
            parts.clear()
        self.size, self.runs = 0, self.runs + 1


class Signatures(_Stage):
    """Stage 1: per shard, signatures, exact hashes and sorted band-key runs."""

    name = "signatures"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg = self.cfg()
        hasher = MinHasher(cfg.num_perm, cfg.shingle, cfg.seed)
        decon = Decontaminator(read_eval_sets(cfg.eval_files, cfg.eval_keys), cfg.ngram) if cfg.eval_files else None
        for i in self.my_shards(rank, world_size):
            if not (self.work / "stats" / f"{i:05d}.json").is_file():
                self._shard(i, cfg, hasher, decon)
        return data

    def _shard(self, i: int, cfg, hasher: MinHasher, decon) -> None:
        shard = self.shard(i)
        for old in (self.work / "runs").glob(f"*/*/{i:05d}.*"):
            old.unlink()
        runs = _RunBuffer(self.work, i, self.plan()["tasks"], cfg.buffer_records)
        stats = {"shard": i, "lines_before": count_lines_before(shard), "records": 0, "documents": 0,
                 "removed": defaultdict(int), "eval_hits": defaultdict(int)}
        sig_path, key_path, pre_path = (self.work / d / f"{i:05d}.{e}" for d, e in
                                        (("sig", "sig"), ("sig", "keys"), ("pre", "jsonl")))
        for p in (sig_path, pre_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        tmps = [p.with_name(p.name + ".tmp") for p in (sig_path, key_path, pre_path)]
        with open(tmps[0], "wb") as sig_f, open(tmps[1], "wb") as key_f, open(tmps[2], "w") as pre:
            batch: Tuple[list, list] = ([], [])
            for line, text, _, bad in iter_shard_records(shard, cfg.text_key, cfg.max_record_bytes):
                stats["records"] += 1
                reason = self._pre_filter(text, bad, decon, stats)
                if reason:
                    stats["removed"][reason[0]] += 1
                    pre.write(json.dumps({"line": line, "stage": reason[0], "detail": reason[1]}) + "\n")
                    continue
                stats["documents"] += 1
                batch[0].append((i << 32) | line)
                batch[1].append(text)
                if len(batch[0]) >= _BATCH:
                    self._flush(batch, cfg, hasher, sig_f, key_f, runs)
                    batch = ([], [])
            self._flush(batch, cfg, hasher, sig_f, key_f, runs)
        runs.flush()
        for tmp, final in zip(tmps, (sig_path, key_path, pre_path)):
            os.replace(tmp, final)
        self.stat_update("documents", value=stats["documents"])
        _atomic_json(self.work / "stats" / f"{i:05d}.json", stats)

    @staticmethod
    def _pre_filter(text, bad, decon, stats):
        if bad:
            return "invalid:" + bad, "unusable record"
        if decon and (found := decon.check(text)):
            for name in found:
                stats["eval_hits"][name] += 1
            return "contaminated", "; ".join(f"{k}: {len(v)} {decon.n}-grams, e.g. {v[0]!r}"
                                             for k, v in sorted(found.items()))
        return None

    @staticmethod
    def _flush(batch, cfg, hasher: MinHasher, sig_f, key_f, runs: _RunBuffer) -> None:
        keys, texts = batch
        if not keys:
            return
        docs = np.asarray(keys, np.uint64)
        key_f.write(docs.tobytes())
        if cfg.exact:
            exact = np.frombuffer(b"".join(text_digest(t, cfg.normalize)[:8] for t in texts), np.uint64)
            runs.add("exact", exact, docs)
        if cfg.near:
            sigs = hasher.signatures(texts)
            sig_f.write(sigs.tobytes())
            runs.add("near", band_keys(sigs, cfg.bands, cfg.rows), docs)


def _run_records(path: Path) -> Iterator[Tuple[int, int]]:
    n = path.stat().st_size // REC.itemsize
    for start in range(0, n, _READ):
        block = np.fromfile(path, REC, min(_READ, n - start), offset=start * REC.itemsize)
        yield from zip(block["key"].tolist(), block["doc"].tolist())


def _merge_down(files: List[Path], tmp_dir: Path) -> List[Path]:
    """At most _FAN_IN sorted run files holding the records of `files`: groups of _FAN_IN are
    merged into longer runs under `tmp_dir` (as often as needed), so the final merge holds one
    read block per file whatever the number of shards."""
    level = 0
    while len(files) > _FAN_IN:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        merged = []
        for g in range(0, len(files), _FAN_IN):
            out = tmp_dir / f"{level:02d}.{g // _FAN_IN:06d}.bin"
            with open(out, "wb") as f:
                buf = []
                for rec in heapq.merge(*map(_run_records, files[g:g + _FAN_IN])):
                    buf.append(rec)
                    if len(buf) >= _READ:
                        f.write(np.array(buf, REC).tobytes())
                        buf = []
                f.write(np.array(buf, REC).tobytes())
            merged.append(out)
        files, level = merged, level + 1
    return files


class _SigStore:
    """Signatures looked up by document key, from the shards' memory-mapped files (LRU of 64)."""

    def __init__(self, work: Path, num_perm: int):
        self.work, self.num_perm, self.open = work, num_perm, OrderedDict()

    def _shard(self, s: int):
        if s not in self.open:
            keys = np.fromfile(self.work / "sig" / f"{s:05d}.keys", np.uint64)
            sig = np.memmap(self.work / "sig" / f"{s:05d}.sig", np.uint32, "r", shape=(len(keys), self.num_perm))
            self.open[s] = (keys, sig)
            if len(self.open) > 64:
                self.open.popitem(last=False)
        self.open.move_to_end(s)
        return self.open[s]

    def get(self, docs: np.ndarray) -> np.ndarray:
        out = np.empty((len(docs), self.num_perm), np.uint32)
        shards = docs >> np.uint64(32)
        for s in np.unique(shards):
            sel = np.nonzero(shards == s)[0]
            keys, sig = self._shard(int(s))
            out[sel] = sig[np.searchsorted(keys, docs[sel])]
        return out


class _EdgeWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f, self.buf, self.count = open(self.tmp, "wb"), [], 0

    def add(self, doc: int, dup: int, kind: int) -> None:
        self.buf.append((doc, dup, kind))
        if len(self.buf) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.f.write(np.array(self.buf, EDGE).tobytes())
            self.count += len(self.buf)
            self.buf = []

    def close(self) -> None:
        self.flush()
        self.f.close()
        os.replace(self.tmp, self.path)


class Buckets(_Stage):
    """Stage 2: task t merges partition t's sorted runs and writes its links (edges/t.bin)."""

    name = "buckets"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg = self.cfg()
        edges = _EdgeWriter(self.work / "edges" / f"{rank:05d}.bin")
        for key, docs in self._groups("exact", rank, 1):
            for d in docs[1:]:
                edges.add(d, docs[0], 0)
        store, pending = _SigStore(self.work, cfg.num_perm), []
        for key, docs in self._groups("near", rank, cfg.bucket_compare):
            first = docs[:cfg.bucket_compare]
            pending.extend((d, f) for j, d in enumerate(docs) for f in first[:min(j, len(first))])
            if len(pending) >= 1 << 15:
                self._confirm(pending, store, cfg.threshold, edges)
                pending = []
        self._confirm(pending, store, cfg.threshold, edges)
        edges.close()
        self.stat_update("links", value=edges.count)
        return data

    def _groups(self, kind: str, part: int, keep: int = 1 << 62) -> Iterator[Tuple[int, List[int]]]:
        """`(key, docs)` of each key with 2+ documents, docs ascending; beyond `keep` documents
        a group yields in slices (each slice's documents then compare with its first `keep`)."""
        files = sorted((self.work / "runs" / kind / f"{part:05d}").glob("*.bin"))
        files = _merge_down(files, self.work / "merge" / kind / f"{part:05d}")
        cur, docs = None, []
        for key, doc in heapq.merge(*map(_run_records, files)):
            if key != cur:
                if len(docs) > 1:
                    yield cur, docs
                cur, docs = key, [doc]
            elif not docs or docs[-1] != doc:
                docs.append(doc)
                if len(docs) >= 4 * keep + 4:  # bound memory: pass on a slice, keep its head
                    yield cur, docs
                    docs = docs[:keep]
        if len(docs) > 1:
            yield cur, docs

    @staticmethod
    def _confirm(pairs, store: _SigStore, threshold: float, edges: _EdgeWriter) -> None:
        if not pairs:
            return
        arr = np.unique(np.array(pairs, np.uint64), axis=0)
        sim = estimated_jaccard(store.get(arr[:, 0]), store.get(arr[:, 1]))
        for (doc, dup) in arr[sim >= threshold].tolist():
            edges.add(doc, dup, 1)


class _UnionFind:
    """Components whose root is their smallest key."""

    def __init__(self):
        self.parent: Dict[int, int] = {}

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p.get(root, root) != root:
            root = p[root]
        while x != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)


class Clusters(_Stage):
    """Stage 3 (one task): components of the links; writes each shard's removed documents."""

    name = "clusters"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        exact, near = _UnionFind(), _UnionFind()
        files = sorted((self.work / "edges").glob("*.bin"))
        for kind in (0, 1):
            for f in files:
                e = np.fromfile(f, EDGE)
                for doc, dup in e[e["kind"] == kind][["doc", "dup"]].tolist():
                    if kind == 0:
                        exact.union(doc, dup)
                    else:
                        near.union(exact.find(doc), exact.find(dup))
        removed = [(d, exact.find(d), 0) for d in exact.parent if exact.find(d) != d]
        removed += [(d, near.find(d), 1) for d in near.parent if near.find(d) != d]
        arr = np.array(sorted(removed), EDGE) if removed else np.zeros(0, EDGE)
        out = self.work / "clusters"
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.bin"):
            old.unlink()
        shards = arr["doc"] >> np.uint64(32)
        for s in np.unique(shards):
            _atomic_bytes(out / f"{int(s):05d}.bin", arr[shards == s].tobytes())
        _atomic_json(out / "done.json", {"removed": len(arr)})
        self.stat_update("removed", value=len(arr))
        return data


def _open_output(path: Path, compression: str):
    if compression == "gz":
        return gzip.GzipFile(path, "wb", mtime=0)  # mtime 0: the same input gives the same bytes
    if compression == "zst":
        import zstandard

        return zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True)
    return open(path, "wb")


class Filter(_Stage):
    """Stage 4: each shard's kept records (unchanged) and its removed list with file:line."""

    name = "filter"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg = self.cfg()
        self._stats: Dict[int, dict] = {}
        for i in self.my_shards(rank, world_size):
            if not (self.work / "final" / f"{i:05d}.json").is_file():
                self._shard(i, cfg)
        return data

    def where(self, key: int) -> str:
        s, line = key >> 32, key & 0xFFFFFFFF
        if s not in self._stats:
            self._stats[s] = json.loads((self.work / "stats" / f"{s:05d}.json").read_text())
        return f"{self.plan()['shards'][s]['path']}:{self._stats[s]['lines_before'] + line}"

    def _shard(self, i: int, cfg) -> None:
        shard, out = self.shard(i), Path(self.out)
        before = json.loads((self.work / "stats" / f"{i:05d}.json").read_text())["lines_before"]
        pre = {}
        with open(self.work / "pre" / f"{i:05d}.jsonl", encoding="utf-8") as f:
            for ln in f:
                r = json.loads(ln)
                pre[r["line"]] = (r["stage"], r["detail"])
        cl = self.work / "clusters" / f"{i:05d}.bin"
        dups = {d: (dup, k) for d, dup, k in (np.fromfile(cl, EDGE).tolist() if cl.is_file() else [])}
        suffix = {"none": "", "gz": ".gz", "zst": ".zst"}[cfg.compression]
        docs_path, rem_path = out / "docs" / f"{i:05d}.jsonl{suffix}", out / "removed" / f"{i:05d}.jsonl"
        for p in (docs_path, rem_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        tmp_docs, tmp_rem = (p.with_name(p.name + ".tmp") for p in (docs_path, rem_path))
        counts = {"records": 0, "kept": 0, "removed": defaultdict(int)}
        with _open_output(tmp_docs, cfg.compression) as kept, open(tmp_rem, "w", encoding="utf-8") as rem:
            for line, _, raw, _ in iter_shard_records(shard, cfg.text_key, cfg.max_record_bytes):
                counts["records"] += 1
                entry = {"file": shard.path, "line": before + line}
                if line in pre:
                    entry["stage"], entry["detail"] = pre[line]
                elif (key := (i << 32) | line) in dups:
                    dup, kind = dups[key]
                    entry["stage"], entry["duplicate_of"] = KINDS[kind], self.where(dup)
                else:
                    kept.write(raw.encode("utf-8") + b"\n")
                    counts["kept"] += 1
                    continue
                counts["removed"][entry["stage"]] += 1
                rem.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp_docs, docs_path)
        os.replace(tmp_rem, rem_path)
        self.stat_update("kept", value=counts["kept"])
        _atomic_json(self.work / "final" / f"{i:05d}.json", counts)


class Summary(_Stage):
    """Stage 5 (one task): DIR/summary.json from the shards' counts."""

    name = "summary"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        n = len(self.plan()["shards"])
        s = {"shards": n, "records": 0, "documents": 0, "kept": 0, "removed": defaultdict(int),
             "eval_hits": defaultdict(int), "config": self.plan()["config"]}
        for i in range(n):
            first = json.loads((self.work / "stats" / f"{i:05d}.json").read_text())
            final = json.loads((self.work / "final" / f"{i:05d}.json").read_text())
            s["records"] += final["records"]
            s["documents"] += first["documents"]
            s["kept"] += final["kept"]
            for k, v in final["removed"].items():
                s["removed"][k] += v
            for k, v in first["eval_hits"].items():
                s["eval_hits"][k] += v
        _atomic_json(Path(self.out) / "summary.json", s)
        return data
