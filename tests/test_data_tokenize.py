"""data_prep.tokenize: round trip through Megatron-Core's reader, bad input, hostile input (deep
JSON, huge lines, compression bombs) with bounded memory, resume after kill -9."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from data_prep import indexed
from data_prep.readers import iter_batches, plan_shards
from data_prep.tokenize import BadRecordError, Options, main, tokenize
from data_prep.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_prep" / "sample" / "corpus.jsonl.gz"

# Texts that stress byte-level BPE and our policy of encoding documents as ordinary text.
EXTRA_TEXTS = [
    "Hello world",
    "日本語のテキストと中文混合 🙂👍🏽 and emoji",
    "a literal <|im_end|> and <|endoftext|> stay text",
    "windows\r\nline endings\r\n",
    "  leading and trailing whitespace  \n\n",
    "tab\tseparated\tvalues\u00a0nbsp \u200b zero-width",
    "x" * 5000,
]


def sample_texts():
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def megatron_docs(prefix):
    """Documents as Megatron-Core's own reader sees them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    return ds, [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same texts spread over .jsonl, .jsonl.gz, .jsonl.zst and .parquet files."""
    zstd = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    texts = sample_texts() + EXTRA_TEXTS
    parts = [texts[i::4] for i in range(4)]
    write_jsonl(d / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(parts[0])])
    write_jsonl(d / "b.jsonl.gz", [{"text": t} for t in parts[1]], opener=gzip.open)
    with open(d / "c.jsonl.zst", "wb") as raw, zstd.ZstdCompressor().stream_writer(raw) as w:
        w.write("".join(json.dumps({"text": t}) + "\n" for t in parts[2]).encode())
    pq.write_table(pa.table({"text": parts[3]}), d / "d.parquet", row_group_size=50)
    order = parts[0] + parts[1] + parts[2] + parts[3]  # inputs are processed in sorted path order
    return d, order


def test_round_trip_all_formats_megatron_reader(corpus, tmp_path):
    d, texts = corpus
    out = tmp_path / "out" / "ds"
    # A small chunk size splits a.jsonl into several byte-range shards over 2 worker processes.
    s = tokenize([str(d / "*")], str(out), Options("qwen2"), workers=2, chunk_mb=0.05, quiet=True)
    assert s.shards > 4 and sum(s.rejects.values()) == 0
    ds, docs = megatron_docs(out)
    assert ds.index.dtype == np.int32  # Megatron's optimal dtype for a 151k vocabulary
    assert len(docs) == len(texts) == s.docs
    tok = get_tokenizer("qwen2")
    for text, ids in zip(texts, docs):
        assert len(ids) > 0
        assert tok.decode(ids.tolist()) == text
    assert sum(len(x) for x in docs) == s.tokens
    assert not (tmp_path / "out" / "ds.shards").exists()


def test_files_equal_megatron_builder_output(corpus, tmp_path):
    """Same ids through Megatron-Core's IndexedDatasetBuilder give byte-identical files."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    d, texts = corpus
    tok = get_tokenizer("qwen3")
    ours = tmp_path / "ours"
    tokenize([str(d / "a.jsonl")], str(ours), Options("qwen3", append_eod=True), quiet=True, chunk_mb=0.05)
    with open(d / "a.jsonl", encoding="utf-8") as f:
        a_texts = [json.loads(line)["text"] for line in f]
    ref = tmp_path / "ref"
    builder = IndexedDatasetBuilder(str(ref) + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for t in a_texts:
        ids = tok.encode(t) + [tok.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(ref) + ".idx")
    for ext in (".bin", ".idx"):
        assert (Path(str(ours) + ext)).read_bytes() == Path(str(ref) + ext).read_bytes(), ext


def test_output_independent_of_workers_and_chunking(corpus, tmp_path):
    d, _ = corpus
    a = tmp_path / "a"
    b = tmp_path / "b"
    tokenize([str(d / "a.jsonl"), str(d / "c.jsonl.zst")], str(a), Options(), workers=1, chunk_mb=32, quiet=True)
    tokenize([str(d / "a.jsonl"), str(d / "c.jsonl.zst")], str(b), Options(), workers=2, chunk_mb=0.02, quiet=True)
    for ext in (".bin", ".idx"):
        assert Path(str(a) + ext).read_bytes() == Path(str(b) + ext).read_bytes()


def test_sharded_tasks_after_merge_equal_one_process(corpus, tmp_path, capsys):
    """--executor local --tasks 3 (datatrove encode tasks + merge task) writes the same files as
    one process; a rerun finds every task done; the kept shards merged by the `indexed merge`
    command give the same dataset again."""
    d, order = corpus
    one, many = tmp_path / "one", tmp_path / "many"
    tokenize([str(d)], str(one), Options(), workers=1, quiet=True)
    args = ["--input", str(d), "--output-prefix", str(many), "--executor", "local", "--tasks", "3",
            "--chunk-mb", "0.05", "--keep-shards", "--quiet"]
    assert main(args) == 0
    assert f"{len(order):,} docs" in capsys.readouterr().out
    for ext in (".bin", ".idx", ".rejects.jsonl"):
        assert Path(str(one) + ext).read_bytes() == Path(str(many) + ext).read_bytes(), ext
    stats = list(Path(f"{many}.shards").glob("*.stats.json"))
    assert len(stats) > 3  # more shards than tasks: tasks took several
    assert main(args) == 0  # resumed: nothing left to do, same summary
    assert f"{len(order):,} docs" in capsys.readouterr().out
    plan = json.loads((Path(f"{many}.logs") / "plan.json").read_text())
    assert indexed.main(["merge", "--output", str(tmp_path / "merged"), *plan["prefixes"]]) == 0
    for ext in (".bin", ".idx"):
        assert Path(str(one) + ext).read_bytes() == (tmp_path / f"merged{ext}").read_bytes()
    assert main(args[:-4] + ["--chunk-mb", "1", "--quiet"]) == 1  # other settings for the same prefix: refused
    assert "had other shards" in capsys.readouterr().err


def test_sharded_dry_run_slurm(corpus, tmp_path, capsys):
    d, _ = corpus
    out = tmp_path / "x"
    assert main(["--input", str(d), "--output-prefix", str(out), "--executor", "slurm", "--partition", "cpu",
                 "--tasks", "8", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --array=0-7" in text and "stage merge: 1 task(s), after encode succeeded" in text
    assert not list(tmp_path.iterdir())


BAD_LINES = [
    # (raw line bytes, reason or None for a good record)
    (b'{"text": "good one"}', None),
    (b"", "blank_line"),
    (b'{"text": "unterminated', "malformed_json"),
    (b'["text", "not an object"]', "malformed_json"),
    (b'{"body": "no text key"}', "missing_key"),
    (b'{"text": 42}', "not_string"),
    (b'{"text": null}', "not_string"),
    (b'{"text": "caf\xe9 latin-1 byte"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": " \\n\\t "}', "empty_text"),
    (b'{"text": "good two \\u00e9"}', None),
]


def _bad_file(path, repeat=1):
    with open(path, "wb") as f:
        for _ in range(repeat):
            for raw, _ in BAD_LINES:
                f.write(raw + b"\n")


def test_bad_input_counted_and_listed(tmp_path):
    reps = 40
    _bad_file(tmp_path / "bad.jsonl", repeat=reps)
    out = tmp_path / "o"
    # ~4 KB chunks: the file is cut into several shards, some boundaries inside bad lines.
    s = tokenize([str(tmp_path / "bad.jsonl")], str(out), Options(), quiet=True, chunk_mb=0.004, keep_shards=True)
    assert s.shards >= 3
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + reps
    assert {k: v for k, v in s.rejects.items() if v} == expected
    assert s.docs == 2 * reps
    rejects = [json.loads(line) for line in open(f"{out}.rejects.jsonl", encoding="utf-8")]
    got = [(r["line"], r["reason"]) for r in rejects]
    want = [(k * len(BAD_LINES) + i + 1, reason) for k in range(reps) for i, (_, reason) in enumerate(BAD_LINES) if reason]
    assert got == want  # file-absolute line numbers even though the file was split into chunks
    assert all(r["file"] == str(tmp_path / "bad.jsonl") for r in rejects)
    _, docs = megatron_docs(out)
    tok = get_tokenizer("qwen2")
    assert [tok.decode(x.tolist()) for x in docs] == ["good one", "good two \u00e9"] * reps


def test_strict_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"document number {i}"}).encode() + b"\n")
        f.write(b'{"text": 7}\n')
    # Chunked, so the failing line sits in a later chunk: the line number must still be absolute.
    with pytest.raises(BadRecordError, match=rf"^{path}:2001: not_string"):
        tokenize([str(path)], str(tmp_path / "o"), Options(strict=True), quiet=True, chunk_mb=0.01)
    assert not (tmp_path / "o.idx").exists()
    assert main(["--input", str(path), "--output-prefix", str(tmp_path / "p"), "--strict", "--quiet"]) == 1
    assert f"{path}:2001: not_string" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope*.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "nope*.jsonl" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="x.txt: unsupported input type"):
        tokenize([str(tmp_path / "x.txt")], str(tmp_path / "o"), Options(), quiet=True)


def _kill_corpus(d: Path, n_files=24):
    texts = sample_texts()
    for k in range(n_files):
        write_jsonl(d / f"part{k:02d}.jsonl", [{"text": f"[{k}] {t}"} for t in texts])


def test_kill9_then_rerun_is_byte_identical(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _kill_corpus(data)
    ref = tmp_path / "ref"
    tokenize([str(data)], str(ref), Options(append_eod=True), quiet=True)

    out = tmp_path / "run" / "ds"
    cmd = [sys.executable, "-m", "data_prep.tokenize", "--input", str(data), "--output-prefix", str(out),
           "--append-eod", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    shard_dir = Path(f"{out}.shards")
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shard_dir.glob("*.idx"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its worker processes, mid-run
    proc.wait()
    assert not Path(f"{out}.idx").exists(), "run finished before the kill; the test needs a larger corpus"
    done = list(shard_dir.glob("*.idx"))
    assert 3 <= len(done) < 24
    for idx in done:  # every published shard index sits next to a complete .bin
        indexed.IndexedReader(str(idx)[: -len(".idx")])

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    reused = int(re.search(r"(\d+) reused\)", rerun.stdout).group(1))
    assert reused == len(done)  # finished shards were skipped, not redone
    for ext in (".bin", ".idx", ".rejects.jsonl"):
        assert Path(f"{out}{ext}").read_bytes() == Path(f"{ref}{ext}").read_bytes(), ext


# ---------------------------------------------------------------- hostile input
# What a downloaded file can hold to exhaust the machine. Each is a listed reject at file:line
# while the records around it are tokenized (exit 0); --strict stops there naming file:line;
# reading it holds about --max-record-bytes, whatever the line's size.

CAP = 1 << 20  # --max-record-bytes in these tests
GOOD = [json.dumps({"text": f"good document {i}"}).encode() + b"\n" for i in range(3)]


def write_stream(path, pieces):
    """Write byte pieces as plain, gzip or zstd (by suffix), never holding the whole content."""
    with open(path, "wb") as raw:
        if str(path).endswith(".gz"):
            z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            for p in pieces:
                raw.write(z.compress(p))
            raw.write(z.flush())
        elif str(path).endswith(".zst"):
            import zstandard

            with zstandard.ZstdCompressor(level=19).stream_writer(raw, closefd=False) as w:
                for p in pieces:
                    w.write(p)
        else:
            for p in pieces:
                raw.write(p)


def long_record(n: int):
    """A valid JSON record whose text is `n` bytes, as 1 MiB pieces."""
    yield b'{"text": "'
    block = b"x" * (1 << 20)
    for start in range(0, n, len(block)):
        yield block[:n - start]
    yield b'"}'


ATTACKS = [
    # (name, file suffix, the bad line as byte pieces, reason)
    ("deep_array", ".jsonl", lambda: [b'{"text": "ok", "meta": ' + b"[" * 1000 + b"]" * 1000 + b"}"], "too_deep"),
    ("deep_unclosed", ".jsonl", lambda: [b"[" * 100_000], "too_deep"),
    ("deep_objects_gzip", ".jsonl.gz", lambda: [b'{"a": ' * 5000 + b"1" + b"}" * 5000], "too_deep"),
    ("long_line_plain", ".jsonl", lambda: long_record(32 << 20), "too_large"),
    ("long_line_gzip", ".jsonl.gz", lambda: long_record(32 << 20), "too_large"),
    ("long_line_zstd", ".jsonl.zst", lambda: long_record(32 << 20), "too_large"),
    ("gzip_bomb", ".jsonl.gz", lambda: long_record(128 << 20), "too_large"),  # ~130 KB -> 128 MiB
    ("zstd_bomb", ".jsonl.zst", lambda: long_record(256 << 20), "too_large"),  # ~8 KB -> 256 MiB
    ("invalid_utf8_zstd", ".jsonl.zst", lambda: [b'{"text": "caf\xe9"}'], "invalid_utf8"),
    ("malformed_gzip", ".jsonl.gz", lambda: [b'{"text": "unterminated'], "malformed_json"),
]


def _read_peak(path, max_bytes=CAP) -> int:
    """Peak Python memory (bytes) to read every record of `path`, and the rejects seen."""
    tracemalloc.start()
    try:
        rejects = [(r.line, r.reason) for shard in plan_shards([str(path)], 1 << 40)
                   for _, _, rej, _, _ in iter_batches(shard, "text", max_bytes=max_bytes) for r in rej]
        return tracemalloc.get_traced_memory()[1], rejects
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name,suffix,bad_line,reason", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_hostile_record_is_a_listed_reject(name, suffix, bad_line, reason, tmp_path, capsys):
    if suffix.endswith(".zst"):
        pytest.importorskip("zstandard")
    path = tmp_path / f"{name}{suffix}"
    write_stream(path, [GOOD[0], GOOD[1], *bad_line(), b"\n", GOOD[2]])

    peak, seen = _read_peak(path)
    assert seen == [(3, reason)]
    assert peak < 16 << 20, f"reading {name} took {peak / 2**20:.1f} MiB with a 1 MiB record limit"

    out = tmp_path / "out" / "ds"
    argv = ["--input", str(path), "--max-record-bytes", "1MiB", "--quiet"]
    assert main(argv + ["--output-prefix", str(out)]) == 0
    rejects = [json.loads(line) for line in open(f"{out}.rejects.jsonl", encoding="utf-8")]
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [(str(path), 3, reason)]
    assert f"{reason}=1" in capsys.readouterr().out
    _, docs = megatron_docs(out)
    tok = get_tokenizer("qwen2")
    assert [tok.decode(d.tolist()) for d in docs] == [f"good document {i}" for i in range(3)]

    with pytest.raises(BadRecordError, match=rf"^{re.escape(str(path))}:3: {reason}: "):
        tokenize([str(path)], str(tmp_path / "strict"), Options(strict=True, max_record_bytes=CAP), quiet=True)
    assert main(argv + ["--output-prefix", str(tmp_path / "strict"), "--strict"]) == 1
    assert f"{path}:3: {reason}" in capsys.readouterr().err
    assert not (tmp_path / "strict.idx").exists()


def test_long_lines_across_chunks_and_at_the_end(tmp_path):
    """A long line spanning many byte chunks of a plain .jsonl is one reject at its own line;
    so is a long last line without a newline; the chunks inside it read only their own range."""
    path = tmp_path / "long.jsonl"
    write_stream(path, [GOOD[0], *long_record(8 << 20), b"\n", GOOD[1], GOOD[2], *long_record(3 << 20)])
    out = tmp_path / "o"
    s = tokenize([str(path)], str(out), Options(max_record_bytes=CAP), chunk_mb=0.25, quiet=True)
    assert s.shards > 40 and s.docs == 3 and s.rejects["too_large"] == 2
    rejects = [json.loads(line) for line in open(f"{out}.rejects.jsonl", encoding="utf-8")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "too_large"), (5, "too_large")]
    assert rejects[0]["detail"].startswith(f"record is {(8 << 20) + 12:,} bytes > --max-record-bytes {CAP:,}")
    assert rejects[1]["detail"].startswith(f"record is {(3 << 20) + 12:,} bytes")
    # --strict: the long line starts in a later chunk, and the error still gives its file line.
    later = tmp_path / "later.jsonl"
    write_stream(later, [GOOD[0] * 30_000, *long_record(3 << 20), b"\n", GOOD[1]])
    with pytest.raises(BadRecordError, match=rf"^{re.escape(str(later))}:30001: too_large"):
        tokenize([str(later)], str(tmp_path / "s"), Options(strict=True, max_record_bytes=CAP), chunk_mb=0.25,
                 quiet=True)
    # A line exactly at the limit is a record; one byte more is not.
    exact = tmp_path / "exact.jsonl"
    rec = json.dumps({"text": "y" * 1000}).encode()
    exact.write_bytes(rec + b"\n" + rec + b"y\n" + rec)
    s = tokenize([str(exact)], str(tmp_path / "e"), Options(max_record_bytes=len(rec)), quiet=True)
    assert s.docs == 2 and s.rejects["too_large"] == 1


def test_json_depth_scan():
    from data_prep.readers import MAX_JSON_DEPTH, json_depth, parse_line

    assert json_depth(b'{"a": "[[[[", "b": [[1]]}') == 3  # brackets inside strings do not count
    assert json_depth(b'"\\"[[[" [[ ]') == 2  # nor after an escaped quote
    assert json_depth(b'"unterminated [[[[[') == 0
    assert json_depth(b"[" * 5_000_000, stop=100) > 100
    deep_text = {"text": "[" * 5000 + "{" * 5000}  # brackets in the text itself are fine
    assert parse_line(json.dumps(deep_text).encode(), "text") == (deep_text["text"], None)
    n = MAX_JSON_DEPTH - 1  # the record's own object is one level
    assert parse_line(b'{"text": "t", "m": ' + b"[" * n + b"]" * n + b"}", "text") == ("t", None)
    n += 1
    assert parse_line(b'{"text": "t", "m": ' + b"[" * n + b"]" * n + b"}", "text")[1] == \
        ("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")


def test_parquet_oversize_value(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": ["first", "x" * (2 * CAP), "third"]}), path)
    peak, seen = _read_peak(path)
    assert seen == [(2, "too_large")]
    s = tokenize([str(path)], str(tmp_path / "o"), Options(max_record_bytes=CAP), quiet=True)
    assert s.docs == 2 and s.rejects["too_large"] == 1


def test_rerun_after_hostile_rejects(tmp_path):
    """A run that rejected hostile records can be rerun: finished shards are reused and the
    outputs are byte-identical (deep JSON used to crash both runs)."""
    data = tmp_path / "data"
    data.mkdir()
    write_stream(data / "a.jsonl", [GOOD[0], b"[" * 5000, b"\n", GOOD[1]])
    write_stream(data / "b.jsonl.gz", [GOOD[2], *long_record(4 << 20), b"\n", GOOD[0]])
    write_stream(data / "c.jsonl", [GOOD[1], b'{"text": "caf\xe9"}\n', GOOD[2]])
    out = tmp_path / "o"
    argv = ["--input", str(data), "--output-prefix", str(out), "--max-record-bytes", "1MiB", "--quiet"]
    assert main(argv + ["--keep-shards"]) == 0
    first = {ext: Path(f"{out}{ext}").read_bytes() for ext in (".bin", ".idx", ".rejects.jsonl")}
    rerun = subprocess.run([sys.executable, "-m", "data_prep.tokenize", *argv], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "(3 shards, 3 reused)" in rerun.stdout
    assert {ext: Path(f"{out}{ext}").read_bytes() for ext in first} == first
    assert [json.loads(line)["reason"] for line in first[".rejects.jsonl"].splitlines()] == \
        ["too_deep", "too_large", "invalid_utf8"]


_HWM = """import sys
from data_prep.tokenize import main
rc = main(sys.argv[1:])
print("VmHWM", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0], file=sys.stderr)
sys.exit(rc)
"""


def peak_rss_mib(*argv) -> float:
    """Peak resident memory of a `data_prep.tokenize` run in its own process (VmHWM counts only
    that process's memory since exec, unlike ru_maxrss, which can carry the forking parent's)."""
    r = subprocess.run([sys.executable, "-c", _HWM, *argv, "--quiet"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return int(re.search(r"VmHWM (\d+)", r.stderr).group(1)) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_zstd_bomb_memory_stays_at_baseline(tmp_path):
    """A few KB of zstd holding one 256 MiB line: the process peaks near a run on a small file."""
    pytest.importorskip("zstandard")
    base, bomb = tmp_path / "base.jsonl.zst", tmp_path / "bomb.jsonl.zst"
    write_stream(base, GOOD)
    write_stream(bomb, [GOOD[0], *long_record(256 << 20), b"\n", GOOD[1], GOOD[2]])
    assert bomb.stat().st_size < 64 << 10
    normal = peak_rss_mib("--input", str(base), "--output-prefix", str(tmp_path / "a"), "--max-record-bytes", "1MiB")
    hostile = peak_rss_mib("--input", str(bomb), "--output-prefix", str(tmp_path / "b"), "--max-record-bytes", "1MiB")
    assert hostile - normal < 32, f"peak RSS {hostile:.0f} MiB vs {normal:.0f} MiB on a small file"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_256mib_line_memory_at_default_limit(suffix, tmp_path):
    """One 256 MiB line under the default --max-record-bytes (16 MiB): rejected, and the peak
    stays within about twice the limit of a run on a small file."""
    if suffix.endswith(".zst"):
        pytest.importorskip("zstandard")
    base, big = tmp_path / f"base{suffix}", tmp_path / f"big{suffix}"
    write_stream(base, GOOD)
    write_stream(big, [GOOD[0], *long_record(256 << 20), b"\n", GOOD[1], GOOD[2]])
    normal = peak_rss_mib("--input", str(base), "--output-prefix", str(tmp_path / "a"))
    hostile = peak_rss_mib("--input", str(big), "--output-prefix", str(tmp_path / "b"))
    assert hostile - normal < 64, f"peak RSS {hostile:.0f} MiB vs {normal:.0f} MiB on a small file"
    rejects = [json.loads(line) for line in open(f"{tmp_path / 'b'}.rejects.jsonl", encoding="utf-8")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "too_large")]


TRICKY_LINES = [
    b'{"text": "plain"}\n', b'{"text": "plain"}', b'  {"text": "spaced"}  \r\n', b'\n', b'   \n', b'',
    b'{"text": ""}', b'{"text": " \\t\\n"}', b'{"text": "\\u3000\\u2003"}', b'{"text": "\\u00a0x"}',
    b'{"text": "\\ud800"}', b'{"text": "\\udc00 low"}', b'{"text": "\\ud83d\\ude00 pair"}',
    b'{"text": "\xff bad utf8"}', b'{"text": "\xed\xa0\x80 encoded surrogate"}', b'\xef\xbb\xbf{"text": "bom"}',
    b'{"text": NaN}', b'{"text": Infinity}', b'{"text": 123456789012345678901234567890}', b'{"text": 1.5}',
    b'{"text": null}', b'{"text": ["a"]}', b'{"text": {"a": 1}}', b'{"other": "x"}', b'["text", "x"]',
    b'"text"', b'{"text": "a", "text": "dup wins"}', b'{"text": "a", "text": 5}', b'{"text": "x"} trailing',
    b'{"text": "x",}', b"{'text': 'single'}", b'{"text": "ctrl\x01char"}', b'{"text": "a\\u0000b"}',
    b'{"text": "x", "n": 1e999}', b'{"text": "t", "m": ' + b"[" * 99 + b"]" * 99 + b"}",
    b'{"text": "t", "m": ' + b"[" * 100 + b"]" * 100 + b"}", b'{"text": "t", "m": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"text": "' + b"[{" * 80 + b'"}', b'{"text": "t", "m": [' + b",".join([b"[1]"] * 150) + b"]}",
    b'{"text": "t", "m": [' + b",".join([b"{}"] * 150) + b"], " + b'"d": ' + b"[" * 98 + b"]" * 98 + b"}",
    b'{"text": "t", "m": [' + b",".join([b"{}"] * 150) + b"], " + b'"d": ' + b"[" * 99 + b"]" * 99 + b"}",
    b'{"text": "\\"quoted\\" and \\\\ slash"}', b'{"text": "caf\xc3\xa9"}',
]


def test_fast_json_path_reads_as_the_standard_library(monkeypatch):
    """Records are parsed by orjson first; every line must read exactly as the standard
    library path alone reads it (same text, same reject reason and detail)."""
    import data_prep.readers as readers

    fast = [readers.parse_line(raw, "text") for raw in TRICKY_LINES]

    def refuse(raw):
        raise readers._OrjsonError("forced", "", 0)

    monkeypatch.setattr(readers, "_orjson_loads", refuse)
    slow = [readers.parse_line(raw, "text") for raw in TRICKY_LINES]
    for raw, f, s in zip(TRICKY_LINES, fast, slow):
        assert f == s, raw[:60]
    assert sum(bad is None for _, bad in slow) >= 10 and {bad[0] for _, bad in slow if bad} >= {
        "blank_line", "invalid_utf8", "malformed_json", "missing_key", "not_string", "empty_text", "too_deep"}


@pytest.mark.parametrize("text", [b'"usable"', b"5"])
def test_record_parsing_memory_is_json_s(text):
    """A record of many tiny arrays, usable or not, at 1 and 5 MiB: reading it takes no more
    memory than json.loads alone takes for it (orjson's path, used up to FAST_JSON_BYTES, holds
    more while it builds such a record, and never holds it while json reads the line again)."""
    import gc

    from data_prep.readers import FAST_JSON_BYTES, parse_line

    for size in (FAST_JSON_BYTES, 5 << 20):
        n = (size - 40) // 3
        raw = b'{"text": ' + text + b', "m": [' + b",".join([b"[]"] * n) + b"]}"
        peaks = []
        for fn in (lambda: json.loads(raw.decode("utf-8")), lambda: parse_line(raw, "text")):
            gc.collect()
            tracemalloc.start()
            fn()
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        limit = 1.2 if size > FAST_JSON_BYTES else 1.7  # small records: orjson, ~1.5x json at most
        assert peaks[1] < limit * peaks[0], (size, text, peaks)


def test_nesting_of_parsed_values_is_the_line_depth():
    from data_prep.readers import json_depth, nesting

    rng = np.random.default_rng(0)

    def value(depth):
        kind = rng.integers(0, 4) if depth < 12 else 3
        if kind == 0:
            return [value(depth + 1) for _ in range(rng.integers(0, 4))]
        if kind == 1:
            return {f"k{i}": value(depth + 1) for i in range(rng.integers(0, 4))}
        return ["[{ in a string", 7, None, 1.5][rng.integers(0, 4)]

    for _ in range(300):
        v = value(0)
        assert nesting(v) == json_depth(json.dumps(v).encode())
    assert nesting([[[[]]]], stop=2) == 3  # counting stops past `stop`


def test_add_packed_refuses_what_it_cannot_store(tmp_path):
    small = indexed.IndexedWriter(tmp_path / "small", 1000)  # a uint16 dataset
    with pytest.raises(ValueError, match="out of range for uint16"):
        small.add_packed(np.array([5, 70000], np.uint32).tobytes(), np.array([2]))
    with pytest.raises(ValueError, match="want uint32"):
        small.add_packed(np.array([5, 6], np.uint64).tobytes(), np.array([2]))
    with pytest.raises(ValueError, match="zero-token document"):
        small.add_packed(np.array([5, 6], np.uint32).tobytes(), np.array([2, 0]))
    small.add_packed(np.array([5, 6, 7], np.uint32).tobytes(), np.array([1, 2]))
    small.commit()
    r = indexed.IndexedReader(tmp_path / "small")
    assert r.dtype == np.uint16 and [r[i].tolist() for i in range(2)] == [[5], [6, 7]]
    wide = indexed.IndexedWriter(tmp_path / "wide", 151_936)
    with pytest.raises(ValueError, match="out of range for int32"):
        wide.add_packed(np.array([1 << 31], np.uint32).tobytes(), np.array([1]))
    wide.abort()


@pytest.mark.parametrize("failure", ["missing", "refused", "midway"])
def test_merge_without_kernel_copy(failure, corpus, tmp_path, monkeypatch):
    """Shards are appended by copy_file_range where the kernel has it; where it is missing,
    refused, or fails after copying part of a shard, the merged files are the same bytes."""
    import os as os_mod

    d, _ = corpus
    tokenize([str(d / "*")], str(tmp_path / "ref"), Options(), workers=1, chunk_mb=0.05, keep_shards=True,
             quiet=True)
    shards = sorted(p.with_suffix("") for p in (tmp_path / "ref.shards").glob("*.idx"))
    assert len(shards) > 2
    real = os_mod.copy_file_range
    if failure == "missing":
        monkeypatch.delattr(os_mod, "copy_file_range")
    elif failure == "refused":
        def refused(*a):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os_mod, "copy_file_range", refused)
    else:
        calls = []

        def midway(src, dst, count):
            calls.append(1)
            if len(calls) % 2 == 0:
                raise OSError(95, "Operation not supported")
            return real(src, dst, max(1, count // 3))
        monkeypatch.setattr(os_mod, "copy_file_range", midway)
    indexed.merge(shards, tmp_path / "again", get_tokenizer("qwen2").vocab_size)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"again{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_bench_per_core_counts_the_same_tokens(tmp_path, capsys):
    """`data_prep.bench --per-core` runs both sides on one corpus and refuses to compare runs
    that tokenized different amounts (it raises when the token counts differ)."""
    from data_prep.bench import main as bench

    assert bench(["--per-core", "1", "--prose", "--size-mb", "0.3", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tokens = int(re.search(r"median ours/bare per core: [0-9.]+ \(([0-9,]+) tokens\)", out).group(1).replace(",", ""))
    assert tokens == sum(len(get_tokenizer("qwen2").encode(json.loads(line)["text"]))
                         for line in open(tmp_path / "corpus.jsonl", encoding="utf-8"))
