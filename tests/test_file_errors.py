"""Bad files at every entry point: each fails with a nonzero exit (or an exception) whose message
names the file and says what is wrong, and none leaves a half-written output behind.

The table covers the tokenizer (truncated/corrupted compressed inputs under --strict, empty
inputs, a run with no usable record, an unwritable output), the HF -> Megatron converter
(truncated or malformed safetensors, malformed config.json, unwritable output), training's
`data.paths` check, and the checkpoint readers (a flipped byte or a missing file in a training
checkpoint is refused by `tools.convert mcore-to-hf`, `tools.logits` and `tools.generate`, as by
resume; `--no-verify` reads it with a warning).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.tokenize import main as tokenize_main
from tests.forked_ranks import run_on_ranks

REPO = Path(__file__).resolve().parent.parent
RECORDS = [{"text": f"document {i}: " + "some words " * (i % 5 + 1)} for i in range(400)]


def _jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _good_jsonl(tmp: Path) -> Path:
    path = tmp / "good.jsonl"
    path.write_bytes(_jsonl_bytes(RECORDS[:50]))
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# ---------------------------------------------------------------- tokenizer cases
# Each returns (argv for data_prep.tokenize, the bad file, a fragment saying what is wrong).


def tok_truncated_gzip(tmp):
    bad = tmp / "web.jsonl.gz"
    bad.write_bytes(gzip.compress(_jsonl_bytes(RECORDS) * 20, mtime=0))
    _truncate(bad)
    return ["--input", str(_good_jsonl(tmp)), str(bad), "--strict"], bad, "gzip stream ends early"


def tok_corrupted_gzip(tmp):
    bad = tmp / "web.jsonl.gz"
    data = bytearray(gzip.compress(_jsonl_bytes(RECORDS), mtime=0))
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    return ["--input", str(_good_jsonl(tmp)), str(bad), "--strict"], bad, "corrupted gzip data"


def tok_truncated_zstd(tmp):
    zstd = pytest.importorskip("zstandard")
    bad = tmp / "web.jsonl.zst"
    bad.write_bytes(zstd.ZstdCompressor().compress(_jsonl_bytes(RECORDS) * 20))
    _truncate(bad)
    return ["--input", str(bad), "--strict"], bad, "zstd stream ends early"


def tok_truncated_parquet(tmp):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    bad = tmp / "web.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in RECORDS]}), bad)
    _truncate(bad)
    return ["--input", str(bad), "--strict"], bad, "unreadable parquet file"


def tok_empty_file(tmp):
    bad = tmp / "empty.jsonl"
    bad.write_bytes(b"")
    return ["--input", str(_good_jsonl(tmp)), str(bad)], bad, "empty input file (0 bytes)"


def tok_empty_after_decompression(tmp):
    bad = tmp / "empty.jsonl.gz"
    bad.write_bytes(gzip.compress(b"", mtime=0))
    return ["--input", str(_good_jsonl(tmp)), str(bad)], bad, "no records in this input file"


def tok_no_document(tmp):
    bad = tmp / "wrong_key.jsonl"
    bad.write_bytes(_jsonl_bytes([{"content": "x"}] * 3))
    return ["--input", str(bad)], bad, "every record was rejected"


def tok_output_under_a_file(tmp):
    blocker = tmp / "not_a_dir"
    blocker.write_text("a file where the output directory should be\n")
    return ["--input", str(_good_jsonl(tmp)), "--output-prefix", str(blocker / "out" / "ds")], blocker / "out", \
        "cannot write the dataset there"


TOKENIZE_CASES = [tok_truncated_gzip, tok_corrupted_gzip, tok_truncated_zstd, tok_truncated_parquet, tok_empty_file,
                  tok_empty_after_decompression, tok_no_document, tok_output_under_a_file]


@pytest.mark.parametrize("case", TOKENIZE_CASES, ids=lambda c: c.__name__)
def test_tokenize_bad_input_names_the_file(case, tmp_path, capsys):
    argv, bad, what = case(tmp_path)
    if "--output-prefix" not in argv:
        argv = argv + ["--output-prefix", str(tmp_path / "out" / "ds")]
    assert tokenize_main(argv + ["--tokenizer", "qwen2", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and what in err, err
    assert not (tmp_path / "out" / "ds.bin").exists() and not (tmp_path / "out" / "ds.idx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_tokenize_read_only_output_dir(tmp_path, capsys):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert tokenize_main(["--input", str(_good_jsonl(tmp_path)), "--output-prefix", str(out_dir / "ds"),
                              "--quiet"]) != 0
    finally:
        out_dir.chmod(stat.S_IRWXU)
    err = capsys.readouterr().err
    assert f"{out_dir}: cannot write the dataset there (Permission denied" in err, err


def test_truncated_gzip_keeps_good_records_and_goes_on(tmp_path, capsys):
    """Without --strict: the damaged file's readable records are kept, one reject names
    file:line where reading stopped, and the other files are tokenized in full."""
    from data_prep.indexed import IndexedReader

    good = _good_jsonl(tmp_path)
    bad = tmp_path / "web.jsonl.gz"
    bad.write_bytes(gzip.compress(_jsonl_bytes(RECORDS) * 20, mtime=0))
    _truncate(bad)
    prefix = tmp_path / "out" / "ds"
    assert tokenize_main(["--input", str(good), str(bad), "--output-prefix", str(prefix), "--quiet",
                          "--tokenizer", "qwen2"]) == 0
    out = capsys.readouterr().out
    rejects = [json.loads(line) for line in open(f"{prefix}.rejects.jsonl")]
    assert [r["reason"] for r in rejects] == ["corrupt_file"]
    lost_at = rejects[0]["line"]
    assert rejects[0]["file"] == str(bad) and "ends early" in rejects[0]["detail"]
    # Every line before the damage was read: the first lost line is the one cut by the truncation.
    readable = gzip.GzipFile(fileobj=open(bad, "rb"))
    complete = 0
    try:
        for line in readable:
            complete += line.endswith(b"\n")
    except EOFError:
        pass
    assert lost_at == complete + 1 and complete > 50
    assert len(IndexedReader(prefix)) == 50 + complete
    assert f"warning: {bad}:{lost_at}:" in out and "corrupt_file=1" in out


# ---------------------------------------------------------------- converter cases (hf-to-mcore)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.test_convert import save_hf

    return save_hf("qwen2", False, tmp_path_factory.mktemp("hf") / "hf", max_shard_size="100KB")


def _hf_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _first_shard(hf: Path) -> Path:
    return sorted(hf.glob("model-*.safetensors"))[0]


def hf_truncated_safetensors(hf, tmp):
    bad = _first_shard(hf)
    _truncate(bad)
    return ["--out", str(tmp / "ckpt")], bad, "not a readable safetensors file"


def hf_truncated_safetensors_header(hf, tmp):
    bad = _first_shard(hf)
    _truncate(bad, keep=0.001)
    return ["--out", str(tmp / "ckpt")], bad, "not a readable safetensors file"


def hf_garbage_safetensors(hf, tmp):
    bad = _first_shard(hf)
    bad.write_bytes(b"this is not a safetensors file\n" * 100)
    return ["--out", str(tmp / "ckpt")], bad, "not a readable safetensors file"


def hf_malformed_config(hf, tmp):
    bad = hf / "config.json"
    _truncate(bad)
    return ["--out", str(tmp / "ckpt")], bad, "not valid JSON"


def hf_malformed_index(hf, tmp):
    bad = hf / "model.safetensors.index.json"
    _truncate(bad)
    return ["--out", str(tmp / "ckpt")], bad, "not valid JSON"


def hf_output_under_a_file(hf, tmp):
    blocker = tmp / "not_a_dir"
    blocker.write_text("x\n")
    return ["--out", str(blocker / "sub" / "ckpt")], blocker / "sub", "cannot write the output there"


HF_CASES = [hf_truncated_safetensors, hf_truncated_safetensors_header, hf_garbage_safetensors, hf_malformed_config,
            hf_malformed_index, hf_output_under_a_file]


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c.__name__)
def test_hf_to_mcore_bad_input_names_the_file(case, hf_dir, tmp_path, capsys):
    from tools.convert import main as convert_main

    hf = _hf_copy(hf_dir, tmp_path / "hf")
    argv, bad, what = case(hf, tmp_path)
    assert convert_main(["hf-to-mcore", "--hf-dir", str(hf)] + argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and what in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------- data.paths


def _dataset(tmp: Path, name: str, records) -> Path:
    src = tmp / f"{name}.jsonl"
    src.write_bytes(_jsonl_bytes(records))
    from data_prep.tokenize import Options, tokenize

    tokenize([str(src)], str(tmp / name), Options("qwen2"), quiet=True)
    return tmp / name


def dp_missing(tmp):
    return str(tmp / "nope"), tmp / "nope.bin", "does not exist"


def dp_with_suffix(tmp):
    prefix = _dataset(tmp, "web", RECORDS[:5])
    return f"{prefix}.bin", Path(f"{prefix}.bin.bin"), f"prefixes without .bin/.idx: data.paths=[{prefix}]"


def dp_missing_idx(tmp):
    prefix = _dataset(tmp, "web", RECORDS[:5])
    Path(f"{prefix}.idx").unlink()
    return str(prefix), Path(f"{prefix}.idx"), "does not exist"


def dp_truncated_idx(tmp):
    prefix = _dataset(tmp, "web", RECORDS[:5])
    _truncate(Path(f"{prefix}.idx"), keep=0.1)
    return str(prefix), Path(f"{prefix}.idx"), "bad header"


def dp_truncated_bin(tmp):
    prefix = _dataset(tmp, "web", RECORDS[:5])
    _truncate(Path(f"{prefix}.bin"))
    return str(prefix), Path(f"{prefix}.bin"), "index expects"


def dp_empty_dataset(tmp):
    from data_prep import indexed

    prefix = tmp / "empty"
    writer = indexed.IndexedWriter(prefix, 151936)  # a 0-document dataset, as older tokenizers wrote
    writer.commit()
    return str(prefix), Path(f"{prefix}.bin"), "holds no tokens"


DATA_PATH_CASES = [dp_missing, dp_with_suffix, dp_missing_idx, dp_truncated_idx, dp_truncated_bin, dp_empty_dataset]


@pytest.mark.parametrize("case", DATA_PATH_CASES, ids=lambda c: c.__name__)
def test_data_paths_checked_naming_the_file(case, tmp_path):
    from megatron_ext.config import Config, ConfigError
    from megatron_ext.data import check_paths

    good = _dataset(tmp_path, "good", RECORDS[:5])
    path, bad, what = case(tmp_path)
    cfg = Config()
    cfg.data.paths = [str(good), path]
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert f"data.paths[1]={path}" in str(e.value) and str(bad) in str(e.value) and what in str(e.value)
    cfg.data.paths = [str(good)]
    check_paths(cfg)  # the good one passes


def test_training_refuses_missing_data_paths_before_building(tmp_path):
    """The entry checks data.paths with the config, before any model exists (exit code 2)."""
    missing = tmp_path / "nowhere" / "corpus"
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", f"data.paths=[{missing}]"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data.paths[0]={missing}" in proc.stderr and "does not exist" in proc.stderr
    assert "model:" not in proc.stderr  # the build logs "model: <name> ..." once it has built one


# ---------------------------------------------------------------- checkpoint readers


def _save_training_checkpoint(rank, world_size, root):
    import torch

    from megatron_ext import build, checkpoint
    from megatron_ext.cli import load_config

    cfg = load_config(["model=qwen2_debug", "data.tokenizer=qwen2", f"checkpoint.dir={root}"])
    rt = build.build(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rt.model[0].module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return str(checkpoint.save(rt, checkpoint.TrainState(step=4)))


@pytest.fixture(scope="module")
def train_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "D"
    return Path(run_on_ranks(_save_training_checkpoint, 1, str(root))[0])


def _corrupt_copy(train_ckpt: Path, tmp: Path) -> tuple:
    """A copy of the checkpoint with one bit flipped in state/__0_0.distcp."""
    root = tmp / "D"
    shutil.copytree(train_ckpt.parent, root)
    ckpt = root / train_ckpt.name
    bad = ckpt / "state" / "__0_0.distcp"
    with open(bad, "r+b") as f:
        f.seek(bad.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return ckpt, bad, "checksum mismatch"


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_mcore_to_hf_refuses_a_corrupted_checkpoint(train_ckpt, tmp_path):
    """The issue's reproduction: one flipped byte in state/__0_0.distcp; the CLI fails naming it."""
    ckpt, bad, what = _corrupt_copy(train_ckpt, tmp_path)
    proc = _run("tools.convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "H"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{bad}: {what}" in proc.stderr and "--no-verify" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "H").exists() and not list(tmp_path.glob(".H.tmp-*"))


def test_logits_and_generate_refuse_a_corrupted_checkpoint(train_ckpt, tmp_path):
    ckpt, bad, what = _corrupt_copy(train_ckpt, tmp_path)
    for argv in (["tools.logits", "--ckpt", str(ckpt.parent), "--tokens", "1,2,3", "--out", str(tmp_path / "l.npy")],
                 ["tools.generate", "--ckpt", str(ckpt), "--tokens", "1,2,3", "--max-new-tokens", "1"]):
        proc = _run(*argv)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"{bad}: {what}" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "l.npy").exists()


def test_no_verify_reads_a_corrupted_checkpoint_with_a_warning(train_ckpt, tmp_path):
    ckpt, _, _ = _corrupt_copy(train_ckpt, tmp_path)
    out = tmp_path / "H"
    proc = _run("tools.convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--no-verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: not checking {ckpt} against its checksum manifest (--no-verify)" in proc.stderr
    shards = sorted(out.glob("*.safetensors"))
    assert shards
    umask = os.umask(0)
    os.umask(umask)
    for f in [*shards, out / "config.json"]:  # the weights get the same mode as every other file
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_logits_reports_what_it_wrote(train_ckpt, tmp_path):
    import numpy as np

    proc = _run("tools.logits", "--ckpt", str(train_ckpt), "--tokens", "1,2,3;4,5,6", "--out", str(tmp_path / "l"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = tmp_path / "l.npy"
    shape = list(np.load(written).shape)
    assert shape[0] == 2 and (
        f"wrote {written}: float32 logits {shape} (the last position of 2 input(s)) from {train_ckpt}"
        in proc.stdout.splitlines()), proc.stdout
