"""End-to-end tokenization benchmark against a Megatron-LM-style baseline, in one run.

    python -m data_prep.bench [--input CORPUS.jsonl] [--size-mb 20] [--workers 1 2]
    python -m data_prep.bench --per-core [ROUNDS] [--prose] [--size-mb 240]
    python -m data_prep.bench --dedup [--docs 10000 20000] [--tasks 1 4] [--no-datatrove]

`--per-core` alternates, ROUNDS times (3), the bare tokenizer (tiktoken's `encode_ordinary` on
every text already in memory, CPU time of that loop alone) and `data_prep.tokenize --workers 1`
(CPU time of the whole process: start, reading, JSON, encoding, writing and merging the shards),
checks both give the same token count and prints each one's tokens per CPU second and the ratio
(target >= 0.9). `--prose` makes the corpus from the bundled English sample instead of code.

`--dedup` measures `data_prep.dedup` on a planted-duplicates corpus (`data_prep.planted`) at
each size: precision, recall on exact / 1%-edited / paragraph-shuffled copies and on all planted
copies, partial-overlap documents removed (should be 0), CPU seconds and peak RSS, next to
datatrove's own MinHash stages with the same shingles and bands.

Without `--input` it writes a corpus of Python source files from this interpreter's standard
library (real code text, available offline) as `{"text": ...}` lines. For each worker count it
times, end to end (JSON parse, tokenize, write `.bin/.idx`):

* baseline: what Megatron-LM's `tools/preprocess_data.py` does: a `multiprocessing.Pool` that
  `json.loads` each line and encodes it alone through a Hugging Face fast tokenizer (built from
  the same `qwen.tiktoken` with `transformers`' tiktoken converter), the parent writing each
  document through Megatron-Core's `IndexedDatasetBuilder`;
* ours: `data_prep.tokenize` (batched tiktoken encoding, sharded, merged).

Both outputs must be byte-identical (same token ids, same files); the script exits 1 if not.
The baseline reads whole lines with no limit, as Megatron-LM does, so an `--input` corpus is first
checked through `data_prep.readers` (every line a JSON object with a string "text", none over
16 MiB or nested deeper than 100 levels); a bad line stops the run (exit 2) naming file:line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from data_prep import SAMPLE_CORPUS
from data_prep.readers import Reject, iter_json_lines
from data_prep.tokenize import Options, tokenize
from data_prep.tokenizer import write_hf_tokenizer


def generate_corpus(path: Path, size_mb: float) -> int:
    """Write stdlib `.py` files as jsonl documents until `size_mb` of text; return the doc count."""
    target = size_mb * 1e6
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    written = docs = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for f in files:
                try:
                    text = f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= target:
                    break
    return docs


def generate_prose(path: Path, size_mb: float) -> int:
    """Write the bundled sample corpus (English prose) again and again until `size_mb`; return the doc count."""
    import gzip

    with gzip.open(SAMPLE_CORPUS, "rb") as f:
        sample = f.read()
    per_copy = sample.count(b"\n")
    copies = max(1, -(-int(size_mb * 1e6) // len(sample)))
    with open(path, "wb") as out:
        for _ in range(copies):
            out.write(sample)
    return copies * per_copy


def check_corpus(path: Path) -> None:
    """Raise ValueError "PATH:LINE: REASON: DETAIL" at the first line the baseline could not read
    within the tokenizer's limits (blank, not JSON, too large or deep, no string "text")."""
    for line, row in iter_json_lines(path):
        if isinstance(row, Reject):
            raise ValueError(f"{path}:{line}: {row.reason}: {row.detail}")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{line}: not a JSON object with a string 'text'")


# --- baseline: per-document encode loop, as Megatron-LM's preprocess_data.py -------------------
_HF = None


def _baseline_init(tokenizer_dir: str) -> None:
    global _HF
    from transformers import AutoTokenizer

    _HF = AutoTokenizer.from_pretrained(tokenizer_dir)


def _baseline_encode(line: str):
    text = json.loads(line)["text"]
    ids = _HF(text, add_special_tokens=False).input_ids
    return ids, len(line.encode("utf-8"))


def run_baseline(corpus: Path, out_prefix: Path, tokenizer_dir: str, workers: int, vocab_size: int) -> dict:
    import warnings

    import numpy as np

    with warnings.catch_warnings():  # megatron-core warns about absent GPU libraries on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    t0 = time.perf_counter()
    docs = tokens = nbytes = 0
    builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    with open(corpus, encoding="utf-8") as fin, mp.get_context("fork").Pool(
            workers, initializer=_baseline_init, initargs=(tokenizer_dir,)) as pool:
        for ids, n in pool.imap(_baseline_encode, fin, 32):
            builder.add_document(np.asarray(ids), [len(ids)])
            docs += 1
            tokens += len(ids)
            nbytes += n
    builder.finalize(f"{out_prefix}.idx")
    return {"docs": docs, "tokens": tokens, "bytes": nbytes, "seconds": time.perf_counter() - t0}


def run_ours(corpus: Path, out_prefix: Path, family: str, workers: int, chunk_mb: float) -> dict:
    t0 = time.perf_counter()
    s = tokenize([str(corpus)], str(out_prefix), Options(family), workers=workers, chunk_mb=chunk_mb, quiet=True)
    return {"docs": s.docs, "tokens": s.tokens, "bytes": os.path.getsize(corpus),
            "seconds": time.perf_counter() - t0}


# --- per core: data_prep.tokenize with one worker against the bare tokenizer --------------------
def bare_tokenizer_run(corpus: str, family: str) -> dict:
    """Tokens and CPU seconds of the tokenizer alone: every text already in memory, one
    `encode_ordinary` call each (what tiktoken users call the tokenizer's speed)."""
    from data_prep.tokenizer import get_tokenizer

    texts = [row["text"] for _, row in iter_json_lines(corpus)]
    encode = get_tokenizer(family)._enc.encode_ordinary
    t0 = time.process_time()
    tokens = 0
    for text in texts:
        tokens += len(encode(text))
    return {"tokens": tokens, "cpu": time.process_time() - t0}


def bench_per_core(corpus: Path, work: Path, family: str, rounds: int) -> float:
    """Alternate the bare tokenizer and a one-worker `data_prep.tokenize` run (whole process:
    start, reading, JSON, writing and merging the shards included) `rounds` times; print tokens
    per CPU second of each and their ratio; return the median ratio."""
    import statistics
    import subprocess

    py = sys.executable
    start = _measured([py, "-c", f"from data_prep.tokenizer import get_tokenizer; get_tokenizer({family!r})"])
    print(f"process start (imports, BPE ranks): {start['cpu']:.2f} CPU s, counted in ours")
    print(f"{'round':>5}  {'bare M tok/s':>12}  {'ours M tok/CPU s':>16}  {'ours/bare':>9}")
    ratios = []
    for i in range(rounds):
        out = subprocess.run([py, "-m", "data_prep.bench", "--bare-run", str(corpus), family],
                             check=True, capture_output=True, text=True).stdout
        bare = json.loads(out.strip().splitlines()[-1])
        prefix = work / "per_core"
        shutil.rmtree(f"{prefix}.shards", ignore_errors=True)
        ours = _measured([py, "-m", "data_prep.tokenize", "--input", str(corpus), "--output-prefix", str(prefix),
                          "--tokenizer", family, "--workers", "1", "--quiet"])
        tokens = json.loads(Path(f"{prefix}.summary.json").read_text())["tokens"]
        if tokens != bare["tokens"]:
            raise RuntimeError(f"the bare tokenizer gave {bare['tokens']} tokens, data_prep.tokenize {tokens}")
        b, o = bare["tokens"] / bare["cpu"], tokens / ours["cpu"]
        ratios.append(o / b)
        print(f"{i + 1:>5}  {b / 1e6:12.2f}  {o / 1e6:16.2f}  {o / b:9.3f}", flush=True)
    median = statistics.median(ratios)
    print(f"median ours/bare per core: {median:.3f} ({tokens:,} tokens)")
    return median


def _row(name: str, workers: int, r: dict, base: Optional[dict]) -> str:
    dt = r["seconds"]
    speedup = f"{base['seconds'] / dt:6.1f}x" if base else "      -"
    return (f"{name:<10}{workers:>3}  {dt:8.2f}s  {r['docs'] / dt:10,.0f}  {r['tokens'] / dt:12,.0f}  "
            f"{r['bytes'] / dt / 1e6:7.2f}  {speedup}")


def same_files(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{e}").read_bytes() == Path(f"{b}{e}").read_bytes() for e in (".bin", ".idx"))


# --- dedup benchmark: ours vs datatrove's MinHash on a planted-duplicates corpus ------------------
def _measured(cmd: List[str]) -> dict:
    """Run `cmd`; its CPU seconds (user + system, children included) and peak RSS in MiB."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode(errors='replace')[-2000:]}")
    return {"cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss / 1024, "wall": time.perf_counter() - t0}


def _ours_removed(out: Path, ids: List[int]) -> List[tuple]:
    pairs = []
    for p in sorted((out / "removed").glob("*.jsonl")):
        for line in p.open(encoding="utf-8"):
            r = json.loads(line)
            if "duplicate_of" in r:
                pairs.append((ids[r["line"] - 1], ids[int(r["duplicate_of"].rsplit(":", 1)[1]) - 1]))
    return pairs


def _datatrove_removed(out: Path, ids: List[int]) -> List[tuple]:
    """(removed, kept document of its cluster) from datatrove's .remove and .clusters files."""
    import numpy as np

    removed = set(np.fromfile(out / "clusters" / "000000.remove", "<u4").tolist()) \
        if (out / "clusters" / "000000.remove").is_file() else set()
    pairs = np.fromfile(out / "clusters" / "000000.clusters", "<u4").reshape(-1, 2) \
        if (out / "clusters" / "000000.clusters").is_file() else np.zeros((0, 2), np.uint32)
    kept = {cid: doc for doc, cid in pairs.tolist() if doc not in removed}
    return [(ids[doc], ids[kept[cid]]) for doc, cid in pairs.tolist() if doc in removed]


def run_datatrove_minhash(corpus: str, out: str, bands: int, rows: int) -> None:
    """datatrove's MinHash stages 1-3 (signatures, buckets, clusters), one process, with our
    settings: word 5-grams of the same words (its English word splitter needs spaCy), `bands` x `rows`
    (datatrove links the documents of a bucket without confirming their similarity)."""
    import datatrove.pipeline.dedup.minhash as dt_minhash
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.utils.hashing import HashConfig
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupSignature)

    from data_prep.quality import words

    class Words:
        def word_tokenize(self, text):
            return words(text)

    dt_minhash.load_word_tokenizer = lambda language: Words()

    def reader(data, rank=0, world_size=1):
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                yield Document(text=json.loads(line)["text"], id=str(i))

    # sha1 shingle hashes: datatrove's xxhash path needs xxhash<4, older than what is installed here.
    cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows, hash_config=HashConfig(64, "sha1"))
    o = Path(out)
    stages = [([reader, MinhashDedupSignature(str(o / "sigs"), cfg)], 1),
              ([MinhashDedupBuckets(str(o / "sigs"), str(o / "buckets"), config=cfg)], bands),
              ([MinhashDedupCluster(str(o / "buckets"), str(o / "clusters"), config=cfg, save_cluster_id=True)], 1)]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(o / f"logs{i}")).run()


def bench_dedup(sizes: Sequence[int], tasks: Sequence[int], work: Path, datatrove: bool, chunk_mb: float = 8.0,
                buffer_records: int = 200_000) -> None:
    """Precision/recall, CPU seconds and peak RSS of our pipeline (its tasks run one after another
    in one process, `--workers 1`, so the peak is the largest task's) and of datatrove's MinHash.
    Shards of `chunk_mb` and runs of `buffer_records` keys: what bounds a task's memory."""
    from data_prep.planted import score, write_planted_corpus

    print(f"dedup: shards of {chunk_mb} MB, key runs of {buffer_records:,} records, 20 bands x 6 rows, "
          "threshold 0.8; CPU = user + system of the whole run")

    print(f"{'docs':>7} {'engine':<11}{'tasks':>5} {'prec':>7} {'exact':>6} {'1%':>6} {'shuf':>6} {'all':>6} "
          f"{'partial':>7} {'CPU s':>7} {'RSS MiB':>8}")
    for n in sizes:
        corpus = work / f"planted{n}.jsonl"
        truth = write_planted_corpus(corpus, n)
        ids = [json.loads(line)["id"] for line in corpus.open(encoding="utf-8")]
        runs = []
        for t in tasks:
            out = work / f"ours{n}_{t}"
            shutil.rmtree(out, ignore_errors=True)
            m = _measured([sys.executable, "-m", "data_prep.dedup", "--input", str(corpus), "--output", str(out),
                           "--tasks", str(t), "--workers", "1", "--chunk-mb", str(chunk_mb),
                           "--buffer-records", str(buffer_records)])
            runs.append((f"ours", t, score(truth, _ours_removed(out, ids)), m))
        if datatrove:
            out = work / f"datatrove{n}"
            shutil.rmtree(out, ignore_errors=True)
            m = _measured([sys.executable, "-m", "data_prep.bench", "--datatrove-run", str(corpus), str(out)])
            runs.append(("datatrove", 1, score(truth, _datatrove_removed(out, ids)), m))
        for name, t, s, m in runs:
            print(f"{n:>7} {name:<11}{t:>5} {s['precision']:>7.4f} {s['recall_exact']:>6.3f} {s['recall_edit1']:>6.3f} "
                  f"{s['recall_shuffled']:>6.3f} {s['recall_all']:>6.3f} {s['partial_removed']:>7.3f} "
                  f"{m['cpu']:>7.1f} {m['rss']:>8.0f}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.bench", description=__doc__.split("\n")[0])
    p.add_argument("--input", help="a .jsonl corpus with a 'text' field (default: generate one)")
    p.add_argument("--size-mb", type=float, default=20.0, help="size of the generated corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default="qwen2", help="Qwen family for both sides")
    p.add_argument("--chunk-mb", type=float, default=32.0, help="our byte-chunk size for plain .jsonl")
    p.add_argument("--workdir", help="where to write outputs (default: a temp dir, removed)")
    p.add_argument("--dedup", action="store_true", help="benchmark data_prep.dedup instead (planted duplicates)")
    p.add_argument("--docs", type=int, nargs="+", default=[10000, 20000], help="--dedup: corpus sizes")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 4], help="--dedup: task counts of our runs")
    p.add_argument("--no-datatrove", action="store_true", help="--dedup: skip datatrove's MinHash")
    p.add_argument("--dedup-chunk-mb", type=float, default=8.0, help="--dedup: shard size of our runs")
    p.add_argument("--buffer-records", type=int, default=200_000, help="--dedup: sorted key run size")
    p.add_argument("--per-core", type=int, metavar="ROUNDS", nargs="?", const=3,
                   help="tokenization per core: one worker against the bare tokenizer, ROUNDS (3) times")
    p.add_argument("--prose", action="store_true", help="generate English prose (the bundled sample "
                   "corpus, repeated) instead of Python source")
    p.add_argument("--datatrove-run", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--bare-run", nargs=2, metavar=("CORPUS", "FAMILY"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.per_core is not None and a.per_core < 1:
        p.error(f"--per-core {a.per_core}: need at least 1 round")
    if a.datatrove_run:
        run_datatrove_minhash(*a.datatrove_run, bands=20, rows=6)
        return 0
    if a.bare_run:
        print(json.dumps(bare_tokenizer_run(*a.bare_run)))
        return 0
    if a.dedup:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(a.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            bench_dedup(a.docs, a.tasks, work, not a.no_datatrove, a.dedup_chunk_mb, a.buffer_records)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = Path(a.input) if a.input else work / "corpus.jsonl"
        if not a.input:
            n = (generate_prose if a.prose else generate_corpus)(corpus, a.size_mb)
            print(f"generated {corpus}: {n:,} docs of {'English prose' if a.prose else 'Python stdlib source'}")
        else:
            try:
                check_corpus(corpus)
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        print(f"corpus: {os.path.getsize(corpus) / 1e6:.1f} MB, cpus: {os.cpu_count()}")
        if a.per_core:
            bench_per_core(corpus, work, a.tokenizer, a.per_core)
            return 0
        hf_dir = write_hf_tokenizer(a.tokenizer.replace(".", "_"), work / "hf_tokenizer")
        from data_prep.tokenizer import get_tokenizer

        vocab = get_tokenizer(a.tokenizer).vocab_size
        print(f"{'':<10}{'wk':>3}  {'time':>9}  {'docs/s':>10}  {'tokens/s':>12}  {'MB/s':>7}  vs base")
        ok, secs = True, {}
        for w in a.workers:
            base = run_baseline(corpus, work / f"base{w}", str(hf_dir), w, vocab)
            print(_row("baseline", w, base, None), flush=True)
            ours = run_ours(corpus, work / f"ours{w}", a.tokenizer, w, a.chunk_mb)
            print(_row("ours", w, ours, base), flush=True)
            ok &= same_files(work / f"base{w}", work / f"ours{w}")
            secs[w] = (base["seconds"], ours["seconds"])
        print(f"token ids identical to baseline (.bin and .idx byte-equal): {ok}")
        lo, hi = min(secs), max(secs)
        if lo != hi:
            print(f"ours with {hi} workers vs baseline with {lo}: {secs[lo][0] / secs[hi][1]:.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
