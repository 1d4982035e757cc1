"""data_prep.dedup: sharded exact + near-duplicate removal and decontamination on datatrove.

A planted-duplicates corpus (data_prep.planted) spread over .jsonl, .jsonl.gz and .parquet files
runs with the local executor at 1 and 4 tasks (identical outputs, every near-identical copy
found, no partial-overlap document removed, exact duplicates equal to data_prep.quality's), and
once through a real one-node Slurm (tests/slurm_cluster.py), which must write the same files.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import dedup_stages
from data_prep.dedup import DedupConfig, main, run_dedup
from data_prep.minhash import MinHasher, band_keys, estimated_jaccard
from data_prep.planted import score, write_planted_corpus
from data_prep.quality import ExactDedup, iter_records
from tests.slurm_cluster import cluster  # noqa: F401 (the local Slurm fixture)

REPO = Path(__file__).resolve().parents[1]
EVAL_ITEM = ("the quick brown fox jumps over the lazy dog while seven wizards quietly "
             "judge the boxing match from afar")


def _split_corpus(src: Path, d: Path) -> list:
    """The corpus's lines over three files (sorted names = input order); returns [(file, line, id)]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in src.read_text().splitlines()]
    rows.insert(7, {"text": "Contaminated: " + EVAL_ITEM + " and more words after it", "id": -1})
    parts = [rows[:len(rows) // 2], rows[len(rows) // 2:3 * len(rows) // 4], rows[3 * len(rows) // 4:]]
    with open(d / "a.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in parts[0])
        f.write("{not json\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in parts[1])
    pq.write_table(pa.table({"text": [r["text"] for r in parts[2]], "id": [r["id"] for r in parts[2]]}),
                   d / "c.parquet", row_group_size=40)
    where = [(str(d / "a.jsonl"), i + 1, r["id"]) for i, r in enumerate(parts[0])]
    where += [(str(d / "b.jsonl.gz"), i + 1, r["id"]) for i, r in enumerate(parts[1])]
    return where + [(str(d / "c.parquet"), i + 1, r["id"]) for i, r in enumerate(parts[2])]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup_corpus")
    truth = write_planted_corpus(d / "planted.jsonl", 600, seed=3)
    inputs = d / "in"
    inputs.mkdir()
    where = _split_corpus(d / "planted.jsonl", inputs)
    (d / "evals.jsonl").write_text(json.dumps({"question": EVAL_ITEM}) + "\n")
    return inputs, truth, {(f, line): i for f, line, i in where}, d / "evals.jsonl"


def _cfg(evals, **kw) -> DedupConfig:
    return DedupConfig(eval_files=[str(evals)], eval_keys=["question"], chunk_mb=0.25, buffer_records=3000, **kw)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parts[len(root.parts)] in ("docs", "removed", "summary.json")}


def _removed(out: Path) -> list:
    return [json.loads(line) for p in sorted((out / "removed").glob("*.jsonl")) for line in p.open()]


@pytest.fixture(scope="module")
def one_task(corpus, tmp_path_factory):
    inputs, _, _, evals = corpus
    out = tmp_path_factory.mktemp("dedup1") / "out"
    summary = run_dedup([str(inputs)], str(out), _cfg(evals), tasks=1)
    return out, summary


def test_one_and_four_tasks_write_identical_files(corpus, one_task, tmp_path):
    inputs, _, _, evals = corpus
    out4 = tmp_path / "out4"
    run_dedup([str(inputs)], str(out4), _cfg(evals), tasks=4, workers=2)
    one, four = _tree(one_task[0]), _tree(out4)
    assert len([k for k in one if k.startswith("docs/")]) >= 4  # several shards, spread over the tasks
    assert one.keys() == four.keys() and all(one[k] == four[k] for k in one)


def test_planted_copies_found_partial_overlaps_kept(corpus, one_task):
    _, truth, ids, _ = corpus
    out, summary = one_task
    pairs = []
    for r in _removed(out):
        if r["stage"] in ("exact_dup", "near_dup"):
            f, line = r["duplicate_of"].rsplit(":", 1)
            pairs.append((ids[(r["file"], r["line"])], ids[(f, int(line))]))
    s = score(truth, pairs)
    assert s["precision"] == 1.0 and s["recall_target"] == 1.0 and s["partial_removed"] == 0.0, s
    assert s["recall_edit20"] == 0.0  # 20% of the words changed is not a near-duplicate at 0.8
    kept = sum(1 for p in (out / "docs").glob("*.jsonl") for _ in p.open())
    assert kept == summary["kept"] == summary["records"] - sum(summary["removed"].values())


def test_exact_duplicates_match_quality_reference(corpus, one_task):
    inputs, _, _, _ = corpus
    ref, first = ExactDedup(normalize=True), set()
    for path, line, text, _, bad in iter_records(sorted(str(p) for p in inputs.iterdir()), "text"):
        if not bad and "Contaminated" not in text and ref.check(text, f"{path}:{line}"):
            first.add((path, line))
    ours = {(r["file"], r["line"]) for r in _removed(one_task[0]) if r["stage"] == "exact_dup"}
    assert ours == first and len(ours) > 10


def test_contaminated_and_invalid_records_listed(corpus, one_task):
    inputs, _, _, _ = corpus
    out, summary = one_task
    by_stage = {}
    for r in _removed(out):
        by_stage.setdefault(r["stage"], []).append(r)
    assert [(r["file"], r["line"]) for r in by_stage["contaminated"]] == [(str(inputs / "a.jsonl"), 8)]
    assert "evals: 7 13-grams" in by_stage["contaminated"][0]["detail"]
    bad = by_stage["invalid:malformed_json"]
    assert len(bad) == 1 and bad[0]["file"] == str(inputs / "a.jsonl")
    assert summary["removed"]["contaminated"] == 1 and summary["eval_hits"] == {"evals": 1}


def test_rerun_resumes_and_refuses_other_settings(corpus, one_task, tmp_path, capsys, monkeypatch):
    inputs, _, _, evals = corpus
    out = tmp_path / "out"
    monkeypatch.setattr(dedup_stages, "_FAN_IN", 2)  # key runs merged in several rounds: same result
    run_dedup([str(inputs)], str(out), _cfg(evals, compression="gz"), tasks=2, workers=1)
    before = _tree(out)
    assert {k: v for k, v in before.items() if k.startswith("removed/")} == \
        {k: v for k, v in _tree(one_task[0]).items() if k.startswith("removed/")}
    # A filter task that died: its completion marker and outputs gone; the rerun redoes only it.
    (out / "logs" / "filter" / "completions" / "00001").unlink()
    for p in (out / "work" / "final").glob("*.json"):
        if int(p.stem) % 2 == 1:
            p.unlink()
            (out / "docs" / f"{p.stem}.jsonl.gz").unlink()
    run_dedup([str(inputs)], str(out), _cfg(evals, compression="gz"), tasks=2, workers=1)
    assert _tree(out) == before
    with gzip.open(next((out / "docs").glob("*.jsonl.gz")), "rt") as f:
        assert "text" in json.loads(f.readline())
    assert main(["--input", str(inputs), "--output", str(out), "--tasks", "3"]) == 1
    assert "holds a run with other" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--input", "/nonexistent/x.jsonl"], "matches no file"),
    (["--threshold", "1.5"], "--threshold 1.5"),
    (["--bands", "30", "--rows", "6"], "at most --num-perm 128"),
    (["--executor", "slurm"], "needs --partition"),
    (["--decontaminate", "/nonexistent/e.jsonl"], "--decontaminate /nonexistent/e.jsonl"),
])
def test_bad_arguments_are_clear_errors(corpus, tmp_path, capsys, args, message):
    inputs = corpus[0]
    argv = ["--input", str(inputs), "--output", str(tmp_path / "o")] + args
    if args[0] == "--input":
        argv = ["--output", str(tmp_path / "o")] + args
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_slurm_dry_run_prints_arrays_and_writes_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--input", str(corpus[0]), "--output", str(out), "--executor", "slurm", "--partition", "cpu",
                 "--tasks", "4", "--dry-run", "--sbatch-arg", "account=proj"]) == 0
    text = capsys.readouterr().out
    assert text.count("#SBATCH --array=0-3") == 3 and text.count("#SBATCH --array=0-0") == 2
    assert "#SBATCH --account=proj" in text and "stage buckets: 4 task(s), after signatures succeeded" in text
    assert not out.exists()


def test_minhash_estimates_jaccard_and_bands_agree():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    hasher = MinHasher(num_perm=256)
    for keep in (1.0, 0.9, 0.7, 0.4):
        a = list(rng.choice(words, 400))
        b = [w if rng.random() < keep else "x" + w for w in a]
        sa, sb = (set(hasher.shingle_hashes(" ".join(t)).tolist()) for t in (a, b))
        true = len(sa & sb) / len(sa | sb)
        sig = hasher.signatures([" ".join(a), " ".join(b)])
        assert abs(estimated_jaccard(sig[0], sig[1]) - true) < 0.08, (keep, true)
    keys = band_keys(np.vstack([sig[0], sig[0], sig[1]]), 20, 6)
    assert (keys[0] == keys[1]).all()
    assert ((keys[0] == keys[2]) == (sig[0, :120].reshape(20, 6) == sig[1, :120].reshape(20, 6)).all(1)).all()


# ---------------------------------------------------------------- real Slurm



def test_slurm_arrays_write_the_same_files(corpus, one_task, cluster):
    inputs, _, _, evals = corpus
    out = cluster.work / "out"
    cmd = [sys.executable, "-m", "data_prep.dedup", "--input", str(inputs), "--output", str(out), "--executor",
           "slurm", "--partition", "debug", "--tasks", "2", "--decontaminate", str(evals), "--eval-key", "question",
           "--chunk-mb", "0.25", "--buffer-records", "3000", "--mem-per-cpu-gb", "1", "--time", "00:10:00"]
    res = cluster.run(cmd, cwd=REPO, timeout=120)
    assert "submitted: signatures=" in res.stdout, res.stdout + res.stderr
    job = res.stdout.split("summary=")[1].split()[0].rstrip(",")
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    logs = "".join(p.read_text(errors="replace")[-2000:] for p in (out / "logs" / "slurm").rglob("*.out"))
    assert info["JobState"] == "COMPLETED", logs
    one, slurm = _tree(one_task[0]), _tree(out)
    assert one.keys() == slurm.keys() and all(one[k] == slurm[k] for k in one)


def test_large_duplicate_groups_stream_through_buckets(tmp_path):
    """Groups larger than a bucket's compared head (exact: 1, near: --bucket-compare) are passed
    on in slices; every copy is still removed, naming the group's first document."""
    import random

    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(3000)]
    a, b = (" ".join(rng.choice(vocab) for _ in range(300)) for _ in range(2))
    rows = [a] * 40 + [b]
    for _ in range(60):
        w = b.split()
        for i in rng.sample(range(len(w)), 2):
            w[i] = rng.choice(vocab) + "x"
        rows.append(" ".join(w))
    rows += [" ".join(rng.choice(vocab) for _ in range(300)) for _ in range(20)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    summary = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), DedupConfig(bucket_compare=4))
    removed = _removed(tmp_path / "out")
    assert summary["removed"] == {"exact_dup": 39, "near_dup": 60}
    first_of = {r["line"]: int(r["duplicate_of"].rsplit(":", 1)[1]) for r in removed}
    assert all(first_of[line] == 1 for line in range(2, 41))
    assert all(first_of[line] == 41 for line in range(42, 102))


def _bench_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 11 and f[0].isdigit():
            rows[(f[1], int(f[2]))] = dict(zip(("prec", "exact", "edit1", "shuf", "all", "partial", "cpu", "rss"),
                                               map(float, f[3:])))
    return rows


def test_bench_dedup_scores_our_run(tmp_path, capsys):
    from data_prep.bench import main as bench

    assert bench(["--dedup", "--docs", "400", "--tasks", "2", "--no-datatrove", "--workdir", str(tmp_path)]) == 0
    row = _bench_rows(capsys.readouterr().out)[("ours", 2)]
    assert row["prec"] == 1.0 and row["exact"] == row["edit1"] == row["shuf"] == 1.0 and row["partial"] == 0.0
    assert 0 < row["cpu"] and 30 < row["rss"]


@pytest.mark.slow
def test_bench_dedup_runs_datatrove_minhash(tmp_path, capsys):
    from data_prep.bench import main as bench

    assert bench(["--dedup", "--docs", "1000", "--tasks", "1", "--workdir", str(tmp_path)]) == 0
    rows = _bench_rows(capsys.readouterr().out)
    assert rows[("datatrove", 1)]["exact"] == 1.0 and rows[("datatrove", 1)]["prec"] > 0.95
