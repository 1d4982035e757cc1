"""Raw text -> Megatron-Core indexed dataset (`OUT.bin` + `OUT.idx`).

    python -m data_prep.tokenize --input 'data/*.jsonl.zst' --output-prefix out/web \\
        --tokenizer qwen2 [--text-key text] [--workers N] [--append-eod] [--strict] \\
        [--max-record-bytes 16MiB]
    python -m data_prep.tokenize ... --executor local --tasks N   # or: --executor slurm --partition P

Inputs are split into shards (one per compressed/parquet file, byte chunks of plain `.jsonl`),
each encoded by a worker process into its own `.bin/.idx` under `OUT.shards/`, then merged in
input order. A shard is published only when complete (temp files + rename, `.idx` last), so a
rerun after a crash skips finished shards and the final output is byte-identical to an
uninterrupted run, whatever the worker count. Bad records are skipped, counted by reason and
listed with file:line in `OUT.rejects.jsonl` (or, with --strict, the first one is fatal). A
truncated or corrupted compressed file keeps the records before the damage and adds one
`corrupt_file` reject at the first line lost; the other files go on (--strict: fatal). Empty
inputs are refused: a 0-byte file or one with no records, and a run that would write no document.

With `--executor`, the shards are encoded by N datatrove tasks (a local process pool, or a Slurm
array; the datatrove stages below), each resumable from its completion marker, and one merge
task then writes the same files as a one-process run; `--dry-run` prints the sbatch scripts.
`python -m data_prep.indexed merge` merges kept shards (`--keep-shards`) or other datasets later.

Inputs are untrusted: a record longer than --max-record-bytes (default 16 MiB, about 4M tokens)
is skipped without being held in memory and listed as `too_large`; JSON nested deeper than 100
levels is listed as `too_deep`; gzip/zstd are decoded in bounded steps. Memory per worker is set
by --max-record-bytes (tokenizing a record takes about 6x its size), not by the input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from datatrove.pipeline.base import PipelineStep

from data_prep import engine, indexed
from data_prep.indexed import check_writable_dir
from data_prep.readers import (DEFAULT_MAX_RECORD_BYTES, REASONS, Shard, count_lines_before, expand_inputs,
                                iter_batches, parse_size, plan_shards)
from data_prep.tokenizer import get_tokenizer


class BadRecordError(ValueError):
    """A rejected record under --strict; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Options:
    """Everything that changes a shard's bytes; part of each shard's name so stale shards are not reused."""

    tokenizer: str = "qwen2"
    text_key: str = "text"
    append_eod: bool = False
    strict: bool = False
    batch_size: int = 1024
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


@dataclass
class Summary:
    """Totals over all shards (finished earlier or in this run) plus this run's throughput."""

    files: int = 0
    shards: int = 0
    shards_skipped: int = 0
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    rejects: Dict[str, int] = None
    seconds: float = 0.0
    run_docs: int = 0
    run_tokens: int = 0
    run_bytes: int = 0
    corrupt: List[str] = None
    """'file:line: detail' of each input that could not be read to its end."""


def shard_prefix(work_dir: Path, shard: Shard, opts: Options) -> Path:
    """Stable name from the input's identity (path, size, mtime), the byte range and the options."""
    st = os.stat(shard.path)
    ident = [os.path.abspath(shard.path), st.st_size, st.st_mtime_ns, asdict(shard), opts.tokenizer,
             opts.text_key, opts.append_eod, opts.strict, opts.max_record_bytes]
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return work_dir / f"{Path(shard.path).name}.{shard.chunk:05d}.{digest}"


def is_done(prefix: Path) -> bool:
    # The .idx is renamed last, so its presence means the whole shard is on disk.
    return indexed.idx_path(prefix).is_file()


_TOKENIZERS: dict = {}


def _tokenizer(name: str):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = get_tokenizer(name)
    return _TOKENIZERS[name]


def encode_shard(shard: Shard, prefix: Path, opts: Options,
                 progress: Optional[Callable[[int, int, int, int], None]] = None) -> dict:
    """Encode one shard into `prefix.{bin,idx}`, its rejects and its stats; return the stats."""
    tok = _tokenizer(opts.tokenizer)
    eod = tok.eod if opts.append_eod else None
    t0 = time.perf_counter()
    writer = indexed.IndexedWriter(prefix, tok.vocab_size)
    rej_path = Path(f"{prefix}.rejects.jsonl")
    stats = {"path": shard.path, "chunk": shard.chunk, "docs": 0, "tokens": 0, "lines": 0,
             "bytes": 0, "rejects": dict.fromkeys(REASONS, 0), "corrupt": None}
    try:
        with open(indexed.tmp_path(rej_path), "w", encoding="utf-8") as rej:
            for nums, texts, rejects, n_lines, n_bytes in iter_batches(shard, opts.text_key, opts.batch_size,
                                                                          opts.max_record_bytes):
                if rejects and opts.strict:
                    r = rejects[0]
                    line = count_lines_before(shard) + r.line
                    raise BadRecordError(f"{shard.path}:{line}: {r.reason}: {r.detail}")
                ids, lengths = tok.encode_packed(texts, eod)
                writer.add_packed(ids, lengths)
                for r in rejects:
                    stats["rejects"][r.reason] += 1
                    if r.reason == "corrupt_file":
                        stats["corrupt"] = f"{shard.path}:{count_lines_before(shard) + r.line}: {r.detail}"
                    rej.write(json.dumps({"line": r.line, "reason": r.reason, "detail": r.detail}) + "\n")
                n_tok = int(lengths.sum())
                stats["docs"] += len(lengths)
                stats["tokens"] += n_tok
                stats["lines"] += n_lines
                stats["bytes"] += n_bytes
                if progress:
                    progress(len(lengths), n_tok, n_bytes, len(rejects))
        stats["seconds"] = time.perf_counter() - t0
        stats_path = Path(f"{prefix}.stats.json")
        with open(indexed.tmp_path(stats_path), "w", encoding="utf-8") as f:
            json.dump(stats, f)
        indexed.fsync_rename(indexed.tmp_path(rej_path), rej_path)
        indexed.fsync_rename(indexed.tmp_path(stats_path), stats_path)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return stats


# --- worker processes -------------------------------------------------------------------------
_QUEUE = None


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def _worker(args) -> dict:
    shard, prefix, opts = args
    return encode_shard(shard, prefix, opts, progress=lambda *a: _QUEUE.put(a))


class Progress:
    """A docs/s, tokens/s, MB/s progress line on stderr (tqdm) that also keeps this run's totals."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no background thread: worker processes are forked later
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self.bar = tqdm(unit="doc", unit_scale=True, disable=quiet, file=sys.stderr, mininterval=1.0,
                        dynamic_ncols=True, desc="tokenize")

    def __call__(self, docs: int, tokens: int, nbytes: int, rejects: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(docs)
        self.bar.set_postfix_str(f"{self.tokens / dt / 1e6:.2f}M tok/s {self.bytes / dt / 1e6:.1f} MB/s",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()


def _run_shards(jobs: List[tuple], workers: int, progress: Progress) -> None:
    """Encode `jobs` in-process (1 worker) or in a spawn pool, feeding progress as batches finish."""
    if workers <= 1 or len(jobs) <= 1:
        for shard, prefix, opts in jobs:
            encode_shard(shard, prefix, opts, progress)
        return
    # fork: workers inherit the loaded BPE ranks and start in milliseconds instead of re-importing.
    # It is safe because the parent runs no threads at this point (tqdm's monitor thread is off).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    for shard, prefix, opts in jobs[:1]:
        _tokenizer(opts.tokenizer)
    queue = ctx.Queue()
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(queue,)) as pool:
        results = [pool.apply_async(_worker, (job,)) for job in jobs]
        pending = list(results)
        while pending:
            _drain(queue, progress, timeout=0.2)
            for r in [r for r in pending if r.ready()]:
                pending.remove(r)
                r.get()  # re-raises a worker's error (e.g. BadRecordError) here; the pool is torn down
        _drain(queue, progress, timeout=0)


def _drain(queue, progress: Progress, timeout: float) -> None:
    import queue as queue_mod

    try:
        item = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        while True:
            progress(*item)
            item = queue.get_nowait()
    except queue_mod.Empty:
        pass


def _merge_rejects(shards: Sequence[Shard], prefixes: Sequence[Path], out: Path) -> None:
    """Write all shards' rejects to `out` in input order, with file-absolute line numbers."""
    tmp = indexed.tmp_path(out)
    offset, last_path = 0, None
    with open(tmp, "w", encoding="utf-8") as dst:
        for shard, prefix in zip(shards, prefixes):
            if shard.path != last_path:
                offset, last_path = 0, shard.path
            with open(f"{prefix}.rejects.jsonl", encoding="utf-8") as src:
                for line in src:
                    r = json.loads(line)
                    dst.write(json.dumps({"file": shard.path, "line": offset + r["line"],
                                          "reason": r["reason"], "detail": r["detail"]}) + "\n")
            with open(f"{prefix}.stats.json", encoding="utf-8") as f:
                offset += json.load(f)["lines"]
    indexed.fsync_rename(tmp, out)


def _chunk_bytes(files: Sequence[str], chunk_mb: float, workers: int) -> int:
    """Byte-chunk size for plain .jsonl: at most `chunk_mb`, but small enough that every worker
    gets about four chunks, so the last chunks do not leave workers idle (the output bytes do
    not depend on the chunking)."""
    chunk = max(int(chunk_mb * (1 << 20)), 4096)
    if workers > 1:
        plain = sum(os.path.getsize(f) for f in files if f.lower().endswith((".jsonl", ".json")))
        chunk = min(chunk, max(plain // (4 * workers), 1 << 20))
    return chunk


class EmptyInputError(ValueError):
    """An input file, or the whole run, holds no document; the message names the file(s)."""


def _refuse_empty_files(files: Sequence[str]) -> None:
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise EmptyInputError(f"{empty[0]}: empty input file (0 bytes){more}; remove it from --input")


def _refuse_empty_results(files: Sequence[str], prefixes: Sequence[Path], output_prefix: str) -> None:
    """After encoding, before anything is merged: a file with no record (e.g. compressed
    emptiness), or a run without a single document, is refused instead of writing a dataset
    that training cannot read."""
    lines, docs = dict.fromkeys(files, 0), 0
    for prefix in prefixes:
        with open(f"{prefix}.stats.json", encoding="utf-8") as f:
            st = json.load(f)
        lines[st["path"]] += st["lines"]
        docs += st["docs"]
    empty = [f for f, n in lines.items() if n == 0]
    if empty:
        raise EmptyInputError(f"{empty[0]}: no records in this input file (empty after decompression)"
                              + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                              + "; remove it from --input")
    if docs == 0:
        raise EmptyInputError(f"no document in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}: every "
                              f"record was rejected (see {output_prefix}.rejects.jsonl); refusing to write "
                              "an empty dataset")


def plan(inputs: Sequence[str], output_prefix: str, opts: Options, chunk_mb: float, workers: int,
         create: bool = True) -> tuple:
    """`(files, shards, shard prefixes, work dir)` of a run; the work dir is created unless `create` is False."""
    files = expand_inputs(inputs)
    _refuse_empty_files(files)
    shards = plan_shards(files, _chunk_bytes(files, chunk_mb, workers))
    work_dir = Path(f"{output_prefix}.shards")
    if create:
        check_writable_dir(Path(output_prefix).absolute().parent, "dataset")
        work_dir.mkdir(exist_ok=True)
    return files, shards, [shard_prefix(work_dir, s, opts) for s in shards], work_dir


def finish(files, shards, prefixes, output_prefix: str, opts: Options, summary: "Summary",
           keep_shards: bool) -> "Summary":
    """Merge the finished shards (in input order) into `output_prefix`, write its rejects and
    summary, remove the shards unless `keep_shards`."""
    _merge_rejects(shards, prefixes, Path(f"{output_prefix}.rejects.jsonl"))
    _refuse_empty_results(files, prefixes, output_prefix)
    vocab_size = _tokenizer(opts.tokenizer).vocab_size
    docs, tokens = indexed.merge(prefixes, Path(output_prefix), vocab_size)
    if (summary.docs, summary.tokens) != (docs, tokens):
        raise RuntimeError(f"merged {docs} docs/{tokens} tokens but shard stats say "
                           f"{summary.docs}/{summary.tokens}; shards in {output_prefix}.shards are inconsistent")
    tmp = indexed.tmp_path(f"{output_prefix}.summary.json")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(summary), f, indent=2)
    os.replace(tmp, f"{output_prefix}.summary.json")
    if not keep_shards:
        shutil.rmtree(f"{output_prefix}.shards")
    return summary


def tokenize(inputs: Sequence[str], output_prefix: str, opts: Options, workers: int = 1,
             chunk_mb: float = 32.0, keep_shards: bool = False, quiet: bool = False) -> Summary:
    """Tokenize `inputs` (paths, globs, directories) into `output_prefix.{bin,idx}`."""
    t0 = time.perf_counter()
    files, shards, prefixes, work_dir = plan(inputs, output_prefix, opts, chunk_mb, workers)
    jobs = [(s, p, opts) for s, p in zip(shards, prefixes) if not is_done(p)]
    if not quiet and len(jobs) < len(shards):
        print(f"resuming: {len(shards) - len(jobs)} of {len(shards)} shards already done", file=sys.stderr)
    progress = Progress(quiet)
    try:
        _run_shards(jobs, workers, progress)
    finally:
        progress.close()
    summary = _summarize(files, shards, prefixes, len(shards) - len(jobs),
                         (progress.docs, progress.tokens, progress.bytes), t0)
    return finish(files, shards, prefixes, output_prefix, opts, summary, keep_shards)


def _summarize(files, shards, prefixes, skipped, run_totals: tuple, t0: Optional[float]) -> Summary:
    """Totals from the shards' stats; `t0` None: the time is the sum of the shards' encode times
    (a sharded run: the throughput is then per task)."""
    s = Summary(files=len(files), shards=len(shards), shards_skipped=skipped, rejects=dict.fromkeys(REASONS, 0),
                corrupt=[])
    encode_seconds = 0.0
    for prefix in prefixes:
        with open(f"{prefix}.stats.json", encoding="utf-8") as f:
            st = json.load(f)
        if st.get("corrupt"):
            s.corrupt.append(st["corrupt"])
        s.docs += st["docs"]
        s.tokens += st["tokens"]
        s.bytes += st["bytes"]
        encode_seconds += st.get("seconds", 0.0)
        for k, v in st["rejects"].items():
            s.rejects[k] += v
    s.seconds = time.perf_counter() - t0 if t0 is not None else encode_seconds
    s.run_docs, s.run_tokens, s.run_bytes = run_totals
    return s


# ---------------------------------------------------------------- as datatrove stages


def plan_path(output_prefix: str) -> Path:
    return Path(f"{output_prefix}.logs") / "plan.json"


def write_plan(output_prefix: str, files, shards, prefixes, opts, keep_shards: bool) -> None:
    """Store the plan; refuse an output prefix whose earlier run had other inputs or options."""
    plan = {"files": list(files), "shards": [asdict(s) for s in shards], "prefixes": [str(p) for p in prefixes],
            "options": asdict(opts), "keep_shards": keep_shards}
    path = plan_path(output_prefix)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = [k for k in plan if old.get(k) != plan[k]]
            raise ValueError(f"{path}: an earlier run of {output_prefix} had other {', '.join(diff)}; rerun it "
                             f"with the same arguments, or remove {path.parent} to start over")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)


class _TokenizeStage(PipelineStep):
    type = "tokenize"

    def __init__(self, output_prefix: str):
        super().__init__()
        self.output_prefix = output_prefix

    def load(self):
        plan = json.loads(plan_path(self.output_prefix).read_text())
        shards = [Shard(**s) for s in plan["shards"]]
        return plan, shards, [Path(p) for p in plan["prefixes"]], Options(**plan["options"])


class EncodeShards(_TokenizeStage):
    name = "encode"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        _, shards, prefixes, opts = self.load()
        for i in range(rank, len(shards), world_size):
            if is_done(prefixes[i]):
                continue
            st = encode_shard(shards[i], prefixes[i], opts)
            self.stat_update("documents", value=st["docs"], unit="task")
            self.stat_update("tokens", value=st["tokens"], unit="task")
        return data


class MergeShards(_TokenizeStage):
    name = "merge"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        plan, shards, prefixes, opts = self.load()
        summary = _summarize(plan["files"], shards, prefixes, 0, (0, 0, 0), None)
        summary.run_docs, summary.run_tokens, summary.run_bytes = summary.docs, summary.tokens, summary.bytes
        finish(plan["files"], shards, prefixes, self.output_prefix, opts, summary, plan["keep_shards"])
        return data


def tokenize_tasks(inputs: Sequence[str], output_prefix: str, opts: Options, tasks: int, executor: str = "local",
                   workers: Optional[int] = None, chunk_mb: float = 32.0, keep_shards: bool = False,
                   slurm=None, dry: bool = False):
    """Tokenize as datatrove stages (`EncodeShards`, `MergeShards`): `tasks` encode tasks, then a
    merge task. Local: runs them and returns the Summary; slurm: submits them and returns the job
    ids; `dry`: returns what would run."""

    engine.check_executor(executor, tasks, slurm)
    output_prefix = str(Path(output_prefix).absolute())
    files, shards, prefixes, _ = plan(inputs, output_prefix, opts, chunk_mb, tasks, create=not dry)
    pipelines = [("encode", [EncodeShards(output_prefix)], tasks), ("merge", [MergeShards(output_prefix)], 1)]
    logs = Path(f"{output_prefix}.logs")
    workers = workers or min(tasks, os.cpu_count() or 1)
    if dry:
        return (f"{len(files)} input files, {len(shards)} shards\n"
                + engine.dry_run(pipelines, logs, executor, workers, slurm))
    write_plan(output_prefix, files, shards, prefixes, opts, keep_shards)
    jobs = engine.run_pipelines(pipelines, logs, executor, workers, slurm)
    if executor == "slurm":
        return jobs
    with open(f"{output_prefix}.summary.json", encoding="utf-8") as f:
        return Summary(**json.load(f))


def format_summary(s: Summary, output_prefix: str) -> str:
    dt = max(s.seconds, 1e-9)
    lines = [
        f"wrote {output_prefix}.bin / .idx: {s.docs:,} docs, {s.tokens:,} tokens from {s.files} files "
        f"({s.shards} shards, {s.shards_skipped} reused)",
        f"this run: {s.seconds:.2f}s, {s.run_docs / dt:,.0f} docs/s, {s.run_tokens / dt:,.0f} tokens/s, "
        f"{s.run_bytes / dt / 1e6:.2f} MB/s",
        f"rejected {sum(s.rejects.values()):,} records"
        + "".join(f", {k}={v}" for k, v in s.rejects.items() if v)
        + (f" (see {output_prefix}.rejects.jsonl)" if any(s.rejects.values()) else ""),
    ]
    lines += [f"warning: {c}" for c in s.corrupt or []]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.tokenize", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="qwen2", help="qwen2 | qwen2_5 | qwen3 | path to an HF tokenizer dir")
    p.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--append-eod", action="store_true", help="end every document with <|endoftext|>")
    p.add_argument("--strict", action="store_true", help="the first bad record is fatal (file:line)")
    p.add_argument("--max-record-bytes", type=parse_size, default=DEFAULT_MAX_RECORD_BYTES, metavar="SIZE",
                   help="longest record read, e.g. 16MiB (the default), 1GB, 500000; a longer one is skipped "
                        "and listed as too_large. Tokenizing a record takes about 6x its size in memory")
    p.add_argument("--chunk-mb", type=float, default=32.0, help="split plain .jsonl files into chunks this big")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--executor", choices=("local", "slurm"),
                   help="run as datatrove tasks (an encode task array, then a merge task), resumable per task; "
                        "without it: --workers processes in this one")
    p.add_argument("--tasks", type=int, default=1, help="encode tasks with --executor")
    p.add_argument("--dry-run", action="store_true", help="with --executor: print the stages (and sbatch scripts)")
    engine.add_slurm_args(p, "tokenize")
    a = p.parse_args(argv)
    opts = Options(a.tokenizer, a.text_key, a.append_eod, a.strict, max_record_bytes=a.max_record_bytes)
    try:
        if a.executor is None:
            if a.dry_run or a.tasks != 1:
                raise ValueError("--tasks and --dry-run need --executor local or --executor slurm")
            summary = tokenize(a.input, a.output_prefix, opts, a.workers, a.chunk_mb, a.keep_shards, a.quiet)
        else:
            summary = tokenize_tasks(a.input, a.output_prefix, opts, a.tasks, a.executor, None, a.chunk_mb,
                                     a.keep_shards, engine.slurm_options(a), a.dry_run)
    except (BadRecordError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: {engine.failed_command(e)}", file=sys.stderr)
        return 1
    if isinstance(summary, Summary):
        print(format_summary(summary, a.output_prefix))
    elif isinstance(summary, dict):
        print("submitted: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        print(f"the summary will be in {a.output_prefix}.summary.json")
    else:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
