"""Exact and near-duplicate removal plus eval-set decontamination, as sharded datatrove stages.

    python -m data_prep.dedup --input FILES_OR_DIR --output DIR [--executor local|slurm] \\
        [--tasks N] [--workers W] [--decontaminate evals/*.jsonl] [--compression gz|zst|none] \\
        [--threshold 0.8] [--bands 20 --rows 6] [--dry-run]

The input is split into shards (a compressed or parquet file each, byte ranges of `--chunk-mb`
of a plain .jsonl), independently of the task count; every output file belongs to one shard, so
the output is the same for 1 task and for N. Stages, each a datatrove task array (Slurm array
or local process pool) that resumes from its per-task completion markers:

1. `signatures` (N tasks): read each shard (bounded readers; parquet batch by batch), drop
   unusable records and documents sharing a 13-gram with an eval set, and write each document's
   MinHash signature, its exact-text hash and its LSH band keys; the keys are sorted in runs of
   at most `--buffer-records` and split into N partitions by key.
2. `buckets` (N tasks): task t merges partition t's runs (streaming); documents with the same
   exact hash are duplicates of the first, documents sharing a band are compared with the
   bucket's first `--bucket-compare` documents and linked when their estimated Jaccard
   similarity (all `--num-perm` values) reaches `--threshold`.
3. `clusters` (1 task): connected components of the links (exact first, then near); each
   component keeps its first document (input order), the others are removed naming it.
4. `filter` (N tasks): write each shard's kept records, unchanged, to `DIR/docs/SHARD.jsonl[.gz|.zst]`
   and its removed records to `DIR/removed/SHARD.jsonl` (file, line, stage, duplicate_of).
5. `summary` (1 task): `DIR/summary.json`: documents in/out and removals per stage.

Memory per task is set by `--chunk-mb` (a shard's keys and removed list), `--buffer-records`
(16 bytes each, sorted in memory), the batch and one bucket's first documents, not by the corpus;
the one clusters task holds an entry per linked document (about one per removed document).
Where this differs from `data_prep.quality`: contaminated documents are dropped before dedup
(never kept as the first of a group), and exact duplicates compare lower-cased text with
whitespace runs collapsed (`--no-normalize`: the raw text).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

from data_prep import engine
from data_prep.dedup_stages import DedupConfig
from data_prep.readers import DEFAULT_MAX_RECORD_BYTES, expand_inputs, parse_size, plan_shards


def write_plan(out: Path, files: Sequence[str], cfg: DedupConfig, tasks: int) -> dict:
    """Plan the shards; refuse a DIR that holds a run with other inputs or settings."""
    shards = plan_shards(files, max(int(cfg.chunk_mb * (1 << 20)), 4096))
    stats = [os.stat(f) for f in files]
    plan = {"files": [os.path.abspath(f) for f in files], "sizes": [[s.st_size, s.st_mtime_ns] for s in stats],
            "shards": [asdict(s) | {"path": os.path.abspath(s.path)} for s in shards],
            "config": asdict(cfg) | {"eval_files": [os.path.abspath(f) for f in cfg.eval_files]}, "tasks": tasks}
    path = out / "work" / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = [k for k in plan if old.get(k) != plan[k]]
            raise ValueError(f"{out}: holds a run with other {', '.join(diff)}; resume it with the same "
                             "command, or choose a new --output")
        return plan
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)
    return plan


def build_pipelines(out: Path, tasks: int) -> List[tuple]:
    """`(stage name, [datatrove step], tasks)` for each stage, in order."""
    from data_prep import dedup_stages as st

    return [("signatures", [st.Signatures(str(out))], tasks),
            ("buckets", [st.Buckets(str(out))], tasks),
            ("clusters", [st.Clusters(str(out))], 1),
            ("filter", [st.Filter(str(out))], tasks),
            ("summary", [st.Summary(str(out))], 1)]


def run_dedup(inputs: Sequence[str], output: str, cfg: DedupConfig, tasks: int = 1, executor: str = "local",
              workers: Optional[int] = None, slurm: Optional[engine.SlurmOptions] = None, dry: bool = False):
    """Plan and run (local) or submit (slurm) the pipeline; return the summary dict (local),
    the submitted job ids (slurm) or the dry-run text."""
    cfg.check()
    engine.check_executor(executor, tasks, slurm)
    files = expand_inputs(inputs)
    for f in cfg.eval_files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--decontaminate {f}: no such file")
    out = Path(output).absolute()
    workers = workers or min(tasks, os.cpu_count() or 1)
    pipelines = build_pipelines(out, tasks)
    if dry:
        n = len(plan_shards(files, max(int(cfg.chunk_mb * (1 << 20)), 4096)))
        head = f"{len(files)} input files, {n} shards"
        return head + "\n" + engine.dry_run(pipelines, out / "logs", executor, workers, slurm)
    from data_prep.indexed import check_writable_dir

    check_writable_dir(out, "deduplicated corpus")
    write_plan(out, files, cfg, tasks)
    jobs = engine.run_pipelines(pipelines, out / "logs", executor, workers, slurm)
    if executor == "slurm":
        return jobs
    return json.loads((out / "summary.json").read_text())


def format_summary(s: dict) -> str:
    removed = ", ".join(f"{k}={v:,}" for k, v in sorted(s["removed"].items())) or "none"
    return (f"documents in: {s['records']:,} records ({s['documents']:,} usable), out: {s['kept']:,} kept "
            f"in {s['shards']} shards\nremoved: {removed}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.dedup", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--output", required=True, help="output directory (docs/, removed/, summary.json)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--tasks", type=int, default=1, help="tasks per sharded stage")
    p.add_argument("--workers", type=int, help="local: tasks run at once (default: min(tasks, cpus))")
    p.add_argument("--dry-run", action="store_true", help="print the stages (and sbatch scripts) only")
    p.add_argument("--text-key", default="text")
    p.add_argument("--no-exact", action="store_true", help="skip the exact-hash stage")
    p.add_argument("--no-normalize", action="store_true", help="exact hash of the raw text (default: lower-cased, "
                   "whitespace runs collapsed)")
    p.add_argument("--no-near", action="store_true", help="skip MinHash near-duplicate removal")
    p.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard that makes a near-duplicate")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, default=20)
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--shingle", type=int, default=5, help="words per shingle")
    p.add_argument("--bucket-compare", type=int, default=8, help="documents of a bucket each one is compared with")
    p.add_argument("--decontaminate", nargs="+", default=[], help="eval set files (JSONL/parquet)")
    p.add_argument("--eval-key", action="append", help="eval text field(s); default: text")
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--max-record-bytes", type=parse_size, default=DEFAULT_MAX_RECORD_BYTES, metavar="SIZE")
    p.add_argument("--chunk-mb", type=float, default=256.0, help="split plain .jsonl files into shards this big")
    p.add_argument("--compression", choices=("none", "gz", "zst"), default="none", help="of the kept documents")
    p.add_argument("--buffer-records", type=int, default=1 << 21, help="band keys sorted in memory per run")
    engine.add_slurm_args(p, "dedup")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parser().parse_args(argv)
    cfg = DedupConfig(a.text_key, not a.no_exact, not a.no_normalize, not a.no_near, a.threshold, a.num_perm,
                      a.bands, a.rows, a.shingle, 1, a.bucket_compare, a.decontaminate, a.eval_key or ["text"],
                      a.ngram, a.max_record_bytes, a.chunk_mb, a.compression, a.buffer_records)
    try:
        slurm = engine.slurm_options(a)
        result = run_dedup(a.input, a.output, cfg, a.tasks, a.executor, a.workers, slurm, a.dry_run)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: {engine.failed_command(e)}", file=sys.stderr)
        return 1
    if a.dry_run:
        print(result)
    elif a.executor == "slurm":
        print("submitted: " + ", ".join(f"{k}={v}" for k, v in result.items()))
        print(f"the summary will be in {a.output}/summary.json")
    else:
        print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
