"""tools.gpu_check on CPU: every planned command parses and validates, it refuses without a GPU,
it loads nothing but the standard library, and its runner keeps to limits and budget (with
stand-in checks: one passes, one hangs with a child, one runs out of memory)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools import gpu_check

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_validates_every_command(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    names = [c.name for c in gpu_check.plan()]
    assert names == ["gpu_tests", "dense_mb1", "dense_mb1_graph", "dense_mb2", "fp8_dense_mb1", "fp8_dense_mb2",
                     "moe_mb1", "fp8_moe_mb1", "long_context", "dense_mb2_graph", "long_context_docs",
                     "fp8_te_current_mb1", "fp8_te_delayed_mb1", "bf16_dense_50", "fp8_dense_50"]
    assert "INVALID" not in out and "tests/test_gpu.py" in out
    for name, baseline in (("fp8_dense_mb1", "dense_mb1"), ("fp8_dense_mb2", "dense_mb2"), ("fp8_moe_mb1", "moe_mb1"),
                           ("fp8_dense_50", "bf16_dense_50")):
        assert f"FP8 via torchao, compared with {baseline}\n" in out, name
    assert "qwen3_30b_a3b (2 layers), bf16, seq 4096, micro-batch 1, global batch 8" in out
    assert "seq 32768, micro-batch 1, global batch 1, document_mask=True" in out
    for c in gpu_check.plan():
        assert ("--compare" in c.argv) == (c.name.startswith(("dense", "moe")) and not c.name.endswith("_graph")), c.name
        assert c.needs_te == c.name.startswith("fp8_te_"), c.name
        assert (c.baseline is not None) == (c.name.startswith("fp8_") and not c.needs_te), c.name
        assert ("train.cuda_graph=true" in c.argv) == c.name.endswith("_graph"), c.name
    graph_mb = {c.name: [a for a in c.argv if a.startswith("train.micro_batch_size=")] for c in gpu_check.plan()}
    assert graph_mb["dense_mb1_graph"] == graph_mb["dense_mb1"] and graph_mb["dense_mb2_graph"] == graph_mb["dense_mb2"]


def test_loads_only_the_standard_library():
    code = ("import sys; import tools.gpu_check; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'megatron', 'hydra', 'omegaconf') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_refuses_without_a_gpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "no CUDA GPU is visible" in captured.err and "--dry-run" in captured.err
    assert "torch" in captured.out and "megatron.core" in captured.out  # what it found, first
    assert not (tmp_path / "gpu_check.json").exists()


FAKE = """
import os, subprocess, sys, time
mode = sys.argv[1]
if mode == "ok":
    print("3 passed, 2 skipped in 0.1s")
elif mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[2], "w").write(str(child.pid))
    time.sleep(120)
elif mode == "oom":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")
    sys.exit(1)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_runner_limits_budget_and_statuses(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_check.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pid_file = tmp_path / "grandchild.pid"
    Check = gpu_check.Check
    monkeypatch.setattr(gpu_check, "plan", lambda: [
        Check("gpu_tests", ["fake_check", "ok"], limit_s=30, min_s=1),
        Check("hangs", ["fake_check", "hang", str(pid_file)], limit_s=3, min_s=1),
        Check("oom", ["fake_check", "oom"], limit_s=30, min_s=1),
        Check("fp8_x", ["fake_check", "ok"], limit_s=30, min_s=1, needs_te=True),
        Check("too_big", ["fake_check", "ok"], limit_s=30, min_s=10_000),
    ])
    packages = {m: "1.0" for m in gpu_check.REQUIRED}
    packages["transformer_engine.pytorch"] = "missing: No module named 'transformer_engine'"
    monkeypatch.setattr(gpu_check, "environment", lambda: dict(
        python="3.12", torch="2.11", cuda="13.0", cuda_available=True, device="fake GPU", device_count=1,
        packages=packages))
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--budget", "120"]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    by_name = {c["name"]: c for c in report["checks"]}
    assert [c["status"] for c in report["checks"]] == ["ok", "timeout", "oom", "skipped", "skipped"]
    assert by_name["gpu_tests"]["numbers"] == {"passed": 3, "skipped": 2} and by_name["gpu_tests"]["rc"] == 0
    assert by_name["hangs"]["timeout_s"] == 3 and by_name["hangs"]["duration_s"] < 30
    time.sleep(0.5)
    assert not _alive(int(pid_file.read_text())), "a timed-out check's own children must be ended too"
    assert "CUDA out of memory" in by_name["oom"]["output_tail"] and by_name["oom"]["rc"] == 1
    assert "Transformer Engine" in by_name["fp8_x"]["note"] and "over budget" in by_name["too_big"]["note"]
    assert report["env"]["device"] == "fake GPU" and (out / "oom.log").exists()
    table = capsys.readouterr().out
    assert "check" in table and "ours/peer" in table and "3 passed, 2 skipped" in table


def test_bench_numbers_from_a_compare_json(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(dict(
        tokens_per_s_per_gpu=30000.0, mfu=0.45, peak_memory_bytes=40 * 2**30, step_time_s=1.1, losses=[12.0, 9.0],
        spec="local", ours_over_transformers=1.5,
        transformers=dict(tokens_per_s_per_gpu=20000.0, mfu=0.3, peak_memory_bytes=30 * 2**30))))
    n = gpu_check.bench_numbers(path)
    assert (n["tokens_per_s"], n["peer_tokens_per_s"], n["ours_over_transformers"]) == (30000.0, 20000.0, 1.5)
    assert (n["peak_memory_gib"], n["peer_peak_memory_gib"], n["first_loss"], n["last_loss"]) == (40, 30, 12.0, 9.0)
    row = gpu_check.table([gpu_check.Outcome("dense_mb1", "cmd", "ok", 0, 60.0, 150, n)]).splitlines()[1]
    assert row.split()[:8] == ["dense_mb1", "ok", "60", "30,000", "45.0", "20,000", "1.50", "40.0"]


def test_fp8_twin_differs_from_its_baseline_only_in_precision():
    plan = {c.name: c for c in gpu_check.plan()}
    for name in ("fp8_dense_mb1", "fp8_moe_mb1", "fp8_dense_50"):
        twin, base = plan[name], plan[plan[name].baseline]
        assert [a for a in twin.argv if a not in gpu_check.FP8_TORCHAO] == \
            [a for a in base.argv if a not in ("precision=bf16", "--compare", "transformers")]


def test_dry_run_rejects_an_fp8_check_that_cannot_compare(monkeypatch, capsys):
    """A twin whose steps (and so learning-rate schedule) differ from its baseline's, and one whose
    baseline comes after it, are invalid."""
    Check = gpu_check.Check
    base = Check("base", ["tools.bench_train", "--warmup", "1", "--steps", "2", "model=qwen3_debug", "precision=bf16"], 60)
    longer = Check("longer", ["tools.bench_train", "--warmup", "1", "--steps", "3", "model=qwen3_debug",
                              *gpu_check.FP8_TORCHAO], 60, baseline="base")
    early = gpu_check.fp8_twin(base, "early")
    monkeypatch.setattr(gpu_check, "plan", lambda: [early, base, longer])
    assert gpu_check.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "longer (limit 60 s): INVALID: train.steps differs from base's" in out
    assert "early (limit 60 s): INVALID: baseline base is not a check before it" in out
    monkeypatch.setattr(gpu_check, "plan", lambda: [base, early])
    assert gpu_check.main(["--dry-run"]) == 0


def test_fp8_numbers_against_the_bf16_baseline(capsys):
    Outcome = gpu_check.Outcome
    numbers = dict(tokens_per_s=30000.0, mfu=0.3, peak_memory_gib=40.0, last_loss=10.1, steps=8)
    base = Outcome("dense_mb2", "cmd", "ok", 0, 60.0, 150, dict(numbers, tokens_per_s=20000.0, last_loss=10.0))
    fp8 = Outcome("fp8_dense_mb2", "cmd", "ok", 0, 60.0, 150, dict(numbers))
    gpu_check.against_baseline(fp8, base)
    assert fp8.numbers["over_baseline"] == 1.5 and fp8.numbers["loss_gap"] == pytest.approx(0.01)
    row = gpu_check.table([base, fp8]).splitlines()[2]
    assert row.split()[:7] == ["fp8_dense_mb2", "ok", "60", "30,000", "30.0", "20,000", "1.50"]
    assert "loss +1.00% after 8 steps" in row
    lost = Outcome("fp8_dense_mb1", "cmd", "ok", 0, 60.0, 150, dict(numbers))
    gpu_check.against_baseline(lost, Outcome("dense_mb1", "cmd", "oom"))
    assert "over_baseline" not in lost.numbers and "dense_mb1 oom" in lost.note
    gpu_check.against_baseline(lost, None)
    assert "not run" in lost.note
