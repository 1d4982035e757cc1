"""Every GPU check in one command: one JSON, one table, a time limit per check and in total.

    python -m tools.gpu_check --out DIR [--budget 480] [--only NAME ...] [--dry-run]

Runs, in this order, each as its own process under its own time limit (killed with its
children when it runs over, so one hang cannot eat the rest):
  gpu_tests       pytest -m gpu on the test files that have gpu-marked tests
  dense_mb1/mb2   tools.bench_train qwen2_5_1_5b, bf16, seq 4096, global batch 8, micro-batch 1 / 2,
                  --compare transformers (the peer trains the same shape in the same run)
  dense_mb1_graph dense_mb1 with train.cuda_graph=true (the step as one CUDA graph), no peer
  moe_mb1         tools.bench_train qwen3_30b_a3b --layers 2, micro-batch 1, --compare transformers
  long_context    tools.bench_train stage=long_context: qwen2_5_1_5b at 32k tokens, documents masked
                  (synthetic EOD-separated documents), one GPU (cp=1), full recompute
  dense_mb2_graph dense_mb2 with train.cuda_graph=true, no peer (after the issue's targets)
  long_context_docs long_context with many documents per sequence (--doc-length 1024: about 32),
                  the packing of web and code corpora
  fp8_dense_mb1/mb2, fp8_moe_mb1
                  dense_mb1/mb2 and moe_mb1 with FP8 GEMMs through torchao (precision=fp8_current,
                  fp8_backend=torchao), no peer: FP8 / BF16 tokens/s and the loss gap against
                  the BF16 check of the same shape on the same data, after the same steps
  fp8_te_*        tools.bench_train with Transformer Engine's FP8 recipes, only where TE imports
  bf16_dense_50, fp8_dense_50
                  dense_mb2 in BF16 and in FP8 (torchao) for 50 steps: the loss gap after 50 steps
A check that no longer fits the remaining budget (default 480 s: 8 minutes on one H100) is
skipped and says so. DIR gets gpu_check.json (written after every check: environment, and per
check the command, exit code, status ok/failed/oom/timeout/skipped, duration, the numbers parsed
from its output, and the tail of its output when it failed), each check's full log and each
bench's own JSON.

At load time this imports only the standard library, and it needs only torch at run time: a GPU
node may have nothing but a CUDA torch, transformers and numpy plus the offline wheelhouse
(README: GPU nodes without internet). It prints what it found first. Without a CUDA GPU it
refuses; `--dry-run` lists the commands instead and checks that each bench command's config
loads and validates (device checks off), which runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 480
SHAPE = ["data.seq_length=4096", "train.global_batch_size=8"]
STEPS = ["--warmup", "2", "--steps", "5"]
OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


@dataclass
class Check:
    name: str
    argv: List[str]
    """Arguments after `python -m`."""
    limit_s: int
    """This check's own time limit."""
    min_s: int = 60
    """Skipped when less than this is left of the total budget: too short to say anything."""
    needs_te: bool = False
    baseline: Optional[str] = None
    """The BF16 check of the same shape and data this one is compared with (FP8 checks)."""

    @property
    def is_bench(self) -> bool:
        return self.argv[0] == "tools.bench_train"


@dataclass
class Outcome:
    name: str
    command: str
    status: str
    """ok, failed, oom, timeout or skipped."""
    rc: Optional[int] = None
    duration_s: float = 0.0
    timeout_s: Optional[int] = None
    numbers: Dict = field(default_factory=dict)
    note: str = ""
    output_tail: str = ""


def gpu_test_files() -> List[str]:
    """Test files with gpu-marked tests: collecting the whole suite would import CPU-only extras."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def graphed(micro_batch: int) -> Check:
    """dense_mb{n} with the step as one CUDA graph (train.cuda_graph; its peer is dense_mb{n}'s):
    its 2 eager steps, then the capture, all before the timed steps."""
    return Check(f"dense_mb{micro_batch}_graph",
                 ["tools.bench_train", "--warmup", "3", "--steps", "5", "model=qwen2_5_1_5b", *SHAPE, "precision=bf16",
                  f"train.micro_batch_size={micro_batch}", "train.cuda_graph=true"], limit_s=120)


FP8_TORCHAO = ["precision=fp8_current", "precision.fp8_backend=torchao"]


def fp8_twin(check: Check, name: Optional[str] = None) -> Check:
    """`check` with FP8 GEMMs through torchao instead of BF16 and without the transformers peer;
    compared with `check` itself (the same steps, so the same learning-rate schedule: a profiled
    step counts in train.steps)."""
    argv, skip = [], False
    for a in check.argv:
        if skip:
            skip = False
        elif a == "--compare":
            skip = True
        elif a != "precision=bf16":
            argv.append(a)
    return Check(name or f"fp8_{check.name}", [*argv, *FP8_TORCHAO], limit_s=check.limit_s, baseline=check.name)


def plan() -> List[Check]:
    """The checks, in order. Steps are few so that all fit 8 minutes on one H100 (about 1-2 s
    per 32k-token step on each side as measured there, plus start-up per bench, which includes
    compiling the fused kernels: 45-60 s on a fresh node): 2 untimed steps (compilation,
    allocator, kernel autotuning), 5 timed. The 32k run recomputes activations: kept for 28
    layers of a 1.5B model they alone would be ~75 GB at that length."""
    bench = ["tools.bench_train", *STEPS]
    dense = [*bench, "model=qwen2_5_1_5b", *SHAPE]
    long_context = ["tools.bench_train", "--warmup", "1", "--steps", "2", "model=qwen2_5_1_5b", "precision=bf16",
                    "stage=long_context", "parallel.cp=1", "data.seq_length=32768", "train.micro_batch_size=1",
                    "train.global_batch_size=1", "train.recompute=full"]
    dense_mb1 = Check("dense_mb1", [*dense, "precision=bf16", "train.micro_batch_size=1",
                                    "--compare", "transformers", "--profile", "1"], limit_s=150)
    dense_mb2 = Check("dense_mb2", [*dense, "precision=bf16", "train.micro_batch_size=2",
                                    "--compare", "transformers", "--profile", "1"], limit_s=150)
    moe_mb1 = Check("moe_mb1", [*bench, "model=qwen3_30b_a3b", "--layers", "2", *SHAPE, "precision=bf16",
                                "train.micro_batch_size=1", "--compare", "transformers", "--profile", "1"], limit_s=150)
    # 50 steps: the loss gap FP8 leaves after a real stretch of training (2 untimed + 48 timed)
    dense_50 = Check("bf16_dense_50", ["tools.bench_train", "--warmup", "2", "--steps", "48", "model=qwen2_5_1_5b",
                                       *SHAPE, "precision=bf16", "train.micro_batch_size=2"], limit_s=150)
    return [
        Check("gpu_tests", ["pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *gpu_test_files()],
              limit_s=240, min_s=30),
        dense_mb1,
        graphed(1),
        dense_mb2,
        fp8_twin(dense_mb1),
        fp8_twin(dense_mb2),
        moe_mb1,
        fp8_twin(moe_mb1),
        Check("long_context", long_context, limit_s=120),
        graphed(2),
        Check("long_context_docs", [*long_context, "--doc-length", "1024"], limit_s=120),
        *(Check(f"fp8_te_{p[4:]}_mb1", [*dense, f"precision={p}", "precision.fp8_backend=te",
                                         "train.micro_batch_size=1"], limit_s=120, needs_te=True)
          for p in ("fp8_current", "fp8_delayed")),
        dense_50,
        fp8_twin(dense_50, "fp8_dense_50"),
    ]


# ---------------------------------------------------------------- environment

PROBE = """
import importlib, json, sys
out = {}
for mod in ("megatron.core", "hydra", "omegaconf", "transformers", "pytest", "transformer_engine.pytorch", "flash_attn",
            "torchao"):
    try:
        m = importlib.import_module(mod)
        out[mod] = getattr(m, "__version__", None) or getattr(sys.modules[mod.split(".")[0]], "__version__", "?")
    except Exception as e:
        out[mod] = "missing: " + (str(e).splitlines() or [type(e).__name__])[0][:200]
print(json.dumps(out))
"""
REQUIRED = ("megatron.core", "hydra", "omegaconf", "transformers", "pytest")


def environment() -> Dict:
    """Python/torch/CUDA/device, and which packages import (in a child: a broken TE must not
    take this process with it)."""
    import platform

    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), device=None, device_count=0)
    if env["cuda_available"]:
        env.update(device=torch.cuda.get_device_name(), device_count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=180)
        env["packages"] = json.loads(probe.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        env["packages"] = {"probe": f"failed: {e}"}
    return env


def has(env: Dict, module: str) -> bool:
    return not str(env["packages"].get(module, "missing")).startswith("missing")


def print_environment(env: Dict) -> None:
    print(f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), "
          f"device: {env['device'] or 'no CUDA GPU'}" + (f" x {env['device_count']}" if env["device_count"] else ""))
    for name, version in env["packages"].items():
        print(f"  {name:28s} {version}")


# ---------------------------------------------------------------- running

def _kill(proc: subprocess.Popen) -> None:
    """End a check and everything it started (it leads its own process group): TERM, a grace
    period for the leader, then KILL for whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def bench_numbers(path: Path) -> Dict:
    """The figures worth a table from a bench JSON."""
    r = json.loads(path.read_text())
    out = dict(tokens_per_s=r["tokens_per_s_per_gpu"], mfu=r["mfu"], peak_memory_gib=r["peak_memory_bytes"] / 2**30,
               step_time_s=r["step_time_s"], first_loss=r["losses"][0], last_loss=r["losses"][-1],
               steps=len(r["losses"]), spec=r["spec"])
    def top(rows):
        return [f"{100 * row['share']:.1f}% {row['name'][:60]}" for row in rows[:8]]

    if r.get("profile"):  # the top of the list: where the next optimisation is
        out["profile_top"] = top(r["profile"])
    if r.get("profile_host"):  # below 100%: the device waits for the host
        out["kernels_fill"] = r["profile_total_ms"] / 1e3 / r["profile_steps"] / r["step_time_s"]
        out["host_top"] = top(r["profile_host"])
    if r.get("profile_python"):  # what the host's Python spends a step on
        out["python_top"] = top(r["profile_python"])
    if "transformers" in r:
        p = r["transformers"]
        out.update(peer_tokens_per_s=p["tokens_per_s_per_gpu"], peer_mfu=p["mfu"],
                   peer_peak_memory_gib=p["peak_memory_bytes"] / 2**30, ours_over_transformers=r["ours_over_transformers"])
    return out


def pytest_numbers(output: str) -> Dict:
    """Counts from pytest's closing line (`3 passed, 9 skipped in 12.0s`)."""
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", output[-2000:])
    return {kind: int(n) for n, kind in counts}


def run_check(check: Check, out: Path, timeout: int) -> Outcome:
    argv = [sys.executable, "-m", *check.argv]
    bench_json = out / f"{check.name}.json"
    if check.is_bench:
        argv += ["--json", str(bench_json)]
    command = " ".join(argv)
    log = out / f"{check.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # A recompilation of a compiled kernel during the timed steps shows in the check's log.
    env.setdefault("TORCH_LOGS", "recompiles")
    print(f"[{check.name}] {command}  (limit {timeout} s)", flush=True)
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, timed_out = proc.returncode, True
    text = log.read_text(errors="replace")
    outcome = Outcome(check.name, command, "ok", rc, round(time.monotonic() - start, 1), timeout)
    if timed_out:
        outcome.status, outcome.note = "timeout", f"killed after its {timeout} s limit"
    elif OOM.search(text) and rc != 0:
        outcome.status = "oom"
    elif rc != 0:
        outcome.status = "failed"
    if check.is_bench and outcome.status == "ok":
        if bench_json.exists():
            outcome.numbers = bench_numbers(bench_json)
        else:
            outcome.status, outcome.note = "failed", "exit 0 but no bench JSON"
    elif not check.is_bench:
        outcome.numbers = pytest_numbers(text)
    if outcome.status != "ok":
        outcome.output_tail = text[-4000:]
    return outcome


def against_baseline(outcome: Outcome, baseline: Optional[Outcome]) -> None:
    """An FP8 check's tokens/s over its BF16 baseline's and the relative gap of their last losses
    (same data, same steps), added to its numbers; or a note saying why there is no comparison."""
    if outcome.status != "ok":
        return
    if baseline is None or baseline.status != "ok":
        outcome.note = "no BF16 baseline to compare with: " + (
            f"{baseline.name} {baseline.status}" if baseline else "it was not run (--only)")
        return
    n, b = outcome.numbers, baseline.numbers
    if n["steps"] != b["steps"]:
        outcome.note = f"ran {n['steps']} steps, its baseline {baseline.name} {b['steps']}: losses not compared"
        return
    n.update(baseline=baseline.name, baseline_tokens_per_s=b["tokens_per_s"],
             over_baseline=n["tokens_per_s"] / b["tokens_per_s"],
             loss_gap=(n["last_loss"] - b["last_loss"]) / abs(b["last_loss"]))


def skipped(check: Check, note: str) -> Outcome:
    return Outcome(check.name, " ".join([sys.executable, "-m", *check.argv]), "skipped", note=note)


# ---------------------------------------------------------------- report

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(outcomes: List[Outcome]) -> str:
    rows = [("check", "status", "time s", "ours tok/s", "MFU", "peer tok/s", "ours/peer", "peak GiB", "note")]
    for o in outcomes:
        n = o.numbers
        note = o.note or (", ".join(f"{v} {k}" for k, v in n.items()) if o.name == "gpu_tests" else "")
        if "kernels_fill" in n:
            note = f"kernels fill {100 * n['kernels_fill']:.0f}% of a step"
        if "loss_gap" in n:  # the peer is the BF16 baseline
            note = f"peer: {n['baseline']} (bf16); loss {100 * n['loss_gap']:+.2f}% after {n['steps']} steps"
        rows.append((o.name, o.status, _fmt(o.duration_s or None, ".0f"), _fmt(n.get("tokens_per_s"), ",.0f"),
                     _fmt(n["mfu"] * 100 if n.get("mfu") is not None else None, ".1f"),
                     _fmt(n.get("peer_tokens_per_s", n.get("baseline_tokens_per_s")), ",.0f"),
                     _fmt(n.get("ours_over_transformers", n.get("over_baseline")), ".2f"),
                     _fmt(n.get("peak_memory_gib"), ".1f"), note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def write(out: Path, env: Dict, budget: int, outcomes: List[Outcome], started: float) -> None:
    report = dict(env=env, budget_s=budget, elapsed_s=round(time.monotonic() - started, 1),
                  checks=[asdict(o) for o in outcomes])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------- CLI

SAME_RUN = ("model.name", "model.num_layers", "data.seq_length", "data.paths", "train.micro_batch_size",
            "train.global_batch_size", "train.steps", "train.seed")
"""What an FP8 check and its BF16 baseline must share for their losses and speeds to compare."""


def _bench_config(check: Check):
    from tools import bench_train as bench

    args, overrides = bench.parse_args(check.argv[1:])
    return bench.bench_config(args, overrides, 1, check_device=False)


def _field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def fp8_problems(check: Check, cfg) -> List[str]:
    """Why an FP8 check would not measure what it says: its recipe does not run through torchao
    in the FP8 GEMMs (checked with one emulated GEMM), or its baseline is not an earlier BF16
    check of the same run."""
    import torch

    from megatron_ext import fp8

    p, problems = cfg.precision, []
    if p.fp8_backend != "torchao" or p.fp8_emulate:
        problems.append(f"precision.fp8_backend={p.fp8_backend}, fp8_emulate={p.fp8_emulate}: not torchao's FP8 GEMMs")
    recipe = fp8.make_recipe(p.name, p.fp8_format, emulate=True)
    x, w = torch.randn(32, 64, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    out = fp8.linear(x, w, None, False, False, False) if fp8.convert_weight(w, recipe) else None
    if out is None or not (out - x @ w.t()).norm() < 0.1 * (x @ w.t()).norm():
        problems.append(f"an emulated {p.name} GEMM does not reproduce the fp32 product")
    problems += [f"weight not a multiple of {fp8.ALIGNMENT}: {u}" for u in fp8.unaligned_weights(cfg)]
    names = [c.name for c in plan()]
    if check.baseline not in names[:names.index(check.name)]:
        return problems + [f"baseline {check.baseline} is not a check before it"]
    base = _bench_config(next(c for c in plan() if c.name == check.baseline))
    problems += [f"{k} differs from {check.baseline}'s" for k in SAME_RUN if _field(cfg, k) != _field(base, k)]
    if base.precision.name != "bf16":
        problems.append(f"baseline {check.baseline} runs precision={base.precision.name}, not bf16")
    return problems


def dry_run(checks: List[Check]) -> int:
    """List the commands; load and validate each bench config without device checks."""
    from tools import bench_train as bench

    bad = 0
    for c in checks:
        status = "ok"
        if c.is_bench:
            try:
                args, overrides = bench.parse_args(c.argv[1:])
                cfg = bench.bench_config(args, overrides, 1, check_device=False)
                t = cfg.train
                status = (f"ok: {cfg.model.name} ({cfg.model.num_layers} layers), {cfg.precision.name}, "
                          f"seq {cfg.data.seq_length}, micro-batch {t.micro_batch_size}, global batch "
                          f"{t.global_batch_size}, document_mask={bench.document_masked(cfg)}, recompute={t.recompute}")
                problems = fp8_problems(c, cfg) if c.baseline else []
                if problems:
                    status, bad = "INVALID: " + "; ".join(problems), bad + 1
                elif c.baseline:
                    status += f"; FP8 via {cfg.precision.fp8_backend}, compared with {c.baseline}"
            except (Exception, SystemExit) as e:
                status, bad = f"INVALID: {e}", bad + 1
        elif not c.argv[-1].endswith(".py"):
            status, bad = "INVALID: no test file has gpu-marked tests", bad + 1
        te = " [only where Transformer Engine imports]" if c.needs_te else ""
        print(f"{c.name} (limit {c.limit_s} s){te}: {status}\n  python -m {' '.join(c.argv)}")
    print(f"{len(checks)} checks, limits add up to {sum(c.limit_s for c in checks)} s; "
          f"the run stops starting checks at its total budget")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="DIR", help="where gpu_check.json, logs and bench JSONs go")
    parser.add_argument("--budget", type=int, default=BUDGET_S, help=f"total seconds (default {BUDGET_S})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks, in plan order")
    parser.add_argument("--dry-run", action="store_true", help="list and validate the commands; run nothing")
    args = parser.parse_args(argv)
    checks = plan()
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in checks})
        if unknown:
            parser.error(f"unknown check(s) {unknown}; known: {[c.name for c in checks]}")
        checks = [c for c in checks if c.name in args.only]
    if args.dry_run:
        return dry_run(checks)
    if not args.out:
        parser.error("--out DIR is required (or use --dry-run)")
    env = environment()
    print_environment(env)
    if not env["cuda_available"]:
        print("error: no CUDA GPU is visible; these checks need one. `--dry-run` lists and validates "
              "the commands on any machine.", file=sys.stderr)
        return 2
    missing = [m for m in REQUIRED if not has(env, m)]
    if missing:
        print(f"error: {missing} do not import; install the offline wheelhouse first (README: GPU nodes "
              "without internet)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, outcomes = time.monotonic(), []
    for check in checks:
        left = int(args.budget - (time.monotonic() - started))
        if check.needs_te and not has(env, "transformer_engine.pytorch"):
            outcomes.append(skipped(check, "Transformer Engine does not import here"))
        elif left < check.min_s:
            outcomes.append(skipped(check, f"over budget: {left} s left of {args.budget} s, needs at least {check.min_s} s"))
        else:
            outcomes.append(run_check(check, out, min(check.limit_s, left)))
        if check.baseline:
            against_baseline(outcomes[-1], next((o for o in outcomes if o.name == check.baseline), None))
        print(f"[{check.name}] {outcomes[-1].status}" + (f": {outcomes[-1].note}" if outcomes[-1].note else ""),
              flush=True)
        write(out, env, args.budget, outcomes, started)
    print(table(outcomes))
    print(f"total {time.monotonic() - started:.0f} s of {args.budget} s; details in {out / 'gpu_check.json'}")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
