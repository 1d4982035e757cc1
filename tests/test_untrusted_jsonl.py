"""jsonl inputs other than the tokenizer's (post-training data, local eval task files, synthesis
task lists) are read through `data_prep.readers`' bounded reader: a line too deeply nested, too
large, or not a JSON object stops the load with a ValueError naming file:line and the reason,
never a RecursionError or MemoryError, and a line over the limit is never held whole."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc

import pytest

from data_prep import readers

CAP = 1 << 20  # the record limit in these tests (the default is 16 MiB)
GOOD = json.dumps({"prompt": "Add: 1 + 2", "answer": "3", "chosen": "3", "rejected": "4"}).encode() + b"\n"

# (name, the bad line, the reason its error names)
BAD_LINES = [
    ("deep_array", b"[" * 100_000, "too_deep"),
    ("deep_objects", b'{"a": ' * 5000 + b"1" + b"}" * 5000, "too_deep"),
    ("deep_in_a_row", b'{"prompt": "x", "meta": ' + b"[" * 2000 + b"]" * 2000 + b"}", "too_deep"),
    ("oversize", b'{"prompt": "' + b"x" * (4 * CAP) + b'"}', "too_large"),
    ("not_json", b'{"prompt": "unterminated', "malformed_json"),
    ("not_an_object", b"[1, 2, 3]", "malformed_json"),
    ("invalid_utf8", b'{"prompt": "caf\xe9"}', "invalid_utf8"),
]


def _write(path, bad: bytes):
    """A good line, a blank line, then the bad line (line 3) and a good line after it."""
    data = GOOD + b"\n" + bad + b"\n" + GOOD
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _config(stage, path, *extra):
    from megatron_ext.cli import load_config

    return load_config([f"stage={stage}", "model=qwen3_debug", f"posttrain.data_path={path}", *extra])


def _sft(path):
    from posttrain.sft import SFTStage

    cfg = _config("sft", path)
    SFTStage(cfg).datasets(cfg, 4, 0)


def _dpo(path):
    from posttrain.dpo import DPOStage

    cfg = _config("dpo", path, "train.micro_batch_size=2", "train.global_batch_size=2")
    DPOStage(cfg).datasets(cfg, 4, 0)


def _rm(path):
    from posttrain.rm import preference_datasets

    preference_datasets(_config("rm", path, "train.micro_batch_size=2", "train.global_batch_size=2"), 4, 0)


def _prm(path):
    from posttrain.prm import PRMStage

    cfg = _config("prm", path)
    PRMStage(cfg).datasets(cfg, 4, 0)


def _grpo(path):
    from posttrain.grpo import prompt_rows

    prompt_rows(_config("grpo", path))


def _eval_task(path):
    from posttrain.evals.tasks import load_task

    load_task(str(path))


def _synth_tasks(path, capsys):
    from data_prep.synth.__main__ import main

    rc = main(["model", "--tasks", str(path), "--n", "10", "--base-url", "http://127.0.0.1:9", "--model", "m",
               "--out", str(path.parent / "out.jsonl")])
    assert rc == 2 and not (path.parent / "out.jsonl").exists()
    raise ValueError(capsys.readouterr().err.removeprefix("error: "))


READERS = [
    ("sft", ".jsonl", _sft),
    ("dpo", ".jsonl", _dpo),
    ("rm", ".jsonl", _rm),
    ("prm", ".jsonl", _prm),
    ("grpo", ".jsonl", _grpo),
    ("eval_task", ".jsonl", _eval_task),
    ("eval_task_gzip", ".jsonl.gz", _eval_task),
    ("synth_tasks", ".jsonl", _synth_tasks),
]


# Every reader meets the hostile lines; the ordinary bad lines, two readers.
CASES = [(r, b) for r in READERS for b in BAD_LINES
         if b[2] in ("too_deep", "too_large") or r[0] in ("sft", "eval_task")]


@pytest.mark.parametrize("reader_name,suffix,read,bad_name,bad,reason", [(*r, *b) for r, b in CASES],
                         ids=[f"{r[0]}-{b[0]}" for r, b in CASES])
def test_bad_line_is_an_error_naming_file_line_and_reason(reader_name, suffix, read, bad_name, bad, reason,
                                                          tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readers, "DEFAULT_MAX_RECORD_BYTES", CAP)
    path = _write(tmp_path / f"data{suffix}", bad)
    args = (path, capsys) if reader_name == "synth_tasks" else (path,)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: {reason}: ") as e:
        read(*args)
    if reason == "too_large":
        assert f"{4 * CAP + 14:,} bytes" in str(e.value)


def test_an_oversize_line_is_never_held(tmp_path, monkeypatch):
    """Reading past a 32 MiB line under a 1 MiB limit holds a few times the limit, not the line
    (the limit's read, a 1 MiB step skipping the rest, the file buffer)."""
    monkeypatch.setattr(readers, "DEFAULT_MAX_RECORD_BYTES", CAP)
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(GOOD + b'{"prompt": "')
        for _ in range(32):
            f.write(b"x" * CAP)
        f.write(b'"}\n' + GOOD)
    from posttrain.datasets import read_jsonl_lines

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: too_large: "):
            read_jsonl_lines(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * CAP, f"{peak / CAP:.1f} MiB held to skip a 32 MiB line"
    # The reader's own iterator lists every line, the bad one as a reject, and goes on after it.
    got = [(line, v.reason if isinstance(v, readers.Reject) else sorted(v))
           for line, v in readers.iter_json_lines(path)]
    assert got == [(1, ["answer", "chosen", "prompt", "rejected"]), (2, "too_large"),
                   (3, ["answer", "chosen", "prompt", "rejected"])]


def test_rows_keep_their_line_numbers_and_compressed_files_are_read(tmp_path):
    from posttrain.datasets import read_jsonl_lines

    rows = [{"i": i} for i in range(3)]
    text = (json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\r\n  \n" + json.dumps(rows[2])).encode()
    (tmp_path / "a.jsonl").write_bytes(text)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(text))
    for name in ("a.jsonl", "a.jsonl.gz"):
        assert read_jsonl_lines(tmp_path / name) == [(1, rows[0]), (3, rows[1]), (5, rows[2])]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text)[:-12])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz:\d+: corrupt_file: the gzip stream ends early"):
        read_jsonl_lines(tmp_path / "cut.jsonl.gz")
