"""data_prep.tokenize: round trip through Megatron-Core's reader, bad input, resume after kill -9."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import indexed
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
