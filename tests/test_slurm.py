"""Slurm launch: the launcher's dry run, and `slurm/train.sbatch` on a real one-node Slurm.

The cluster tests start munged + slurmctld + slurmd on localhost (tests/slurm_cluster.py) and
submit the real template with CPU settings: 2 tasks, gloo, the debug model, a few steps (and
one `stage=eval` job on a one-step checkpoint). They skip, saying why, only where Slurm cannot
be started (packages missing, not root).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import cluster  # noqa: F401 (the local Slurm fixture)

REPO = Path(__file__).resolve().parent.parent
# slurm/ is a folder of scripts, not a package: load slurm/launch.py under its own name.
_spec = importlib.util.spec_from_file_location("slurm_launch", REPO / "slurm" / "launch.py")
launch = sys.modules["slurm_launch"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(launch)

STEP = re.compile(r"step\s+(\d+)/(\d+) \| lm_loss ([0-9.eE+-]+|nan|inf)")
# Small and fast on 2 shared cores: 2 ranks (DP=2), debug model, short sequences.
CPU_RUN = ["data.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=1",
           "train.warmup_steps=1"]
CPU_SBATCH = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


# ---------------------------------------------------------------- dry run (no Slurm needed)


def dry_run(capsys, *args):
    code = launch.main(["--dry-run", *args], env={})
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_qwen3_8b_two_nodes(capsys):
    code, out, err = dry_run(capsys, "--nodes", "2", "stage=pretrain", "model=qwen3_8b", "parallel.tp=4",
                             "precision=bf16", "train.global_batch_size=256", "train.micro_batch_size=1",
                             "data.seq_length=4096")
    assert code == 0, err
    assert "world: 2 node(s) x 8 ranks = 16 ranks" in out
    assert "TP=4 PP=1 CP=1 DP=4" in out
    assert "micro 1 x DP 4 x 64 micro-batches per step" in out
    assert "node 0: ranks 0-7 | PP stage 0 | DP replica 0-1 | TP rank 0-3" in out
    assert "node 1: ranks 8-15 | PP stage 0 | DP replica 2-3 | TP rank 0-3" in out
    assert "groups inside one node: TP; across nodes: DP" in out
    command = next(line for line in out.splitlines() if line.startswith("command:"))
    assert "srun --ntasks=16 --ntasks-per-node=8" in command and "-m megatron_ext.train" in command
    assert "checkpoint.dir=runs/qwen-train/checkpoints checkpoint.load=auto" in command
    assert "name: qwen3_8b" in out  # the resolved config follows


def test_dry_run_moe_expert_parallel_stays_in_node(capsys):
    code, out, err = dry_run(capsys, "--nodes", "2", "model=qwen3_30b_a3b", "parallel.ep=8", "parallel.pp=2",
                             "train.global_batch_size=64", "train.micro_batch_size=1")
    assert code == 0, err
    assert "TP=1 PP=2 CP=1 DP=8 SP=off | experts: EP=8 ETP=1 expert-DP=1" in out
    assert "node 0: ranks 0-7 | PP stage 0" in out and "node 1: ranks 8-15 | PP stage 1" in out
    assert "groups inside one node: DP, EP; across nodes: PP" in out


def test_dry_run_warns_when_tp_leaves_the_node(capsys):
    code, out, _ = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "4", "model=qwen3_8b", "parallel.tp=8",
                           "train.global_batch_size=8", "train.micro_batch_size=1")
    assert code == 0
    assert "warning: TP groups span nodes" in out


@pytest.mark.parametrize("args, message", [
    (["--nodes", "1", "parallel.tp=3"], "world size 8 is not divisible by parallel.tp*pp*cp = 3*1*1 = 3"),
    (["--nodes", "3", "train.global_batch_size=8"], "train.global_batch_size=8 is not divisible by "
                                                     "train.micro_batch_size*dp = 2*24"),
    (["--nodes", "1", "model=qwen3_30b_a3b", "parallel.ep=16"], "world size 8 is not divisible by parallel.ep*etp*pp"),
    (["--tasks-per-node", "16"], "16 tasks per node but 8 GPUs per node"),
    (["stage=nosuchstage"], "stage=nosuchstage has no conf/stage/nosuchstage.yaml; the stages are cpt_code, cpt_math, dpo, grpo, long_context, pretrain, prm, rm, sft"),
    (["parallel.tp"], "not a key=value override: parallel.tp"),
    (["parallel.nosuchkey=1"], "parallel.nosuchkey"),
])
def test_dry_run_rejects_layouts_that_do_not_fit(capsys, args, message):
    code, out, err = dry_run(capsys, *args)
    assert code == 2
    assert message in err
    assert "command:" not in out  # nothing resolved, nothing printed as launchable


def test_requeue_prefers_the_jobs_own_checkpoints(tmp_path):
    own = tmp_path / "own"
    overrides = [f"checkpoint.dir={own}", "checkpoint.load=/weights/hf_converted", "checkpoint.weights_only=true"]
    out, notes = launch.with_checkpoint_overrides(overrides, "job")
    assert out == overrides and not notes  # first run: start from the given weights
    (own / "iter_0000010").mkdir(parents=True)
    out, notes = launch.with_checkpoint_overrides(overrides, "job")
    assert out[-2:] == ["checkpoint.load=auto", "checkpoint.weights_only=false"]  # requeued: resume
    assert "resuming from them" in notes[0]
    out, _ = launch.with_checkpoint_overrides(["train.steps=3"], "myjob")
    assert out == ["train.steps=3", "checkpoint.dir=runs/myjob/checkpoints", "checkpoint.load=auto"]


def test_requeued_preference_and_rl_stages_keep_their_start_model_as_reference(tmp_path):
    own = tmp_path / "own"
    overrides = ["stage=grpo", f"checkpoint.dir={own}", "checkpoint.load=/ckpt/sft", "checkpoint.weights_only=true"]
    out, _ = launch.with_checkpoint_overrides(overrides, "job")
    assert out == overrides + ["posttrain.ref_load=/ckpt/sft"]
    (own / "iter_0000010").mkdir(parents=True)
    out, _ = launch.with_checkpoint_overrides(overrides, "job")
    assert out[-3:] == ["posttrain.ref_load=/ckpt/sft", "checkpoint.load=auto", "checkpoint.weights_only=false"]
    out, _ = launch.with_checkpoint_overrides(["stage=sft", "checkpoint.load=/ckpt/base", f"checkpoint.dir={tmp_path}/x"], "j")
    assert not any(o.startswith("posttrain.ref_load") for o in out)  # no reference model in SFT


def test_dry_run_applies_the_stage_rules(capsys):
    """The stage's own checks run before anything queues: GRPO's group size must divide the
    global batch (the same setting python -m posttrain.grpo refuses)."""
    rc = launch.main(["--dry-run", "stage=grpo", "grpo.group_size=3", "train.micro_batch_size=4"], env={})
    assert rc == 2
    assert "grpo.group_size=3 must be >= 2 and divide" in capsys.readouterr().err


# ---------------------------------------------------------------- stage=eval


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A one-step debug-model pretraining checkpoint (one process), to evaluate."""
    root = tmp_path_factory.mktemp("tiny-ckpt")
    res = subprocess.run([sys.executable, "-m", launch.ENTRY, "stage=pretrain", "train.steps=1",
                          "train.warmup_steps=0", "data.seq_length=32", "train.global_batch_size=2",
                          "train.micro_batch_size=2", f"checkpoint.dir={root}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (root / "latest").read_text().strip() == "iter_0000001"
    root.chmod(0o755)  # the Slurm job reads it
    return root


def test_dry_run_eval_runs_tools_eval_with_the_users_overrides(capsys, tiny_checkpoint, tmp_path):
    user = [f"checkpoint.load={tiny_checkpoint}", "eval.tasks=[math_synth,code_synth]", "eval.limit=2",
            "eval.temperature=0.7", "eval.k=2", f"eval.out={tmp_path}/report.json"]
    code, out, err = dry_run(capsys, "--nodes", "2", "stage=eval", *user)
    assert code == 0, err
    command = next(line for line in out.splitlines() if line.startswith("command:"))
    # The user's overrides as given, less stage=eval: no checkpoint.dir / checkpoint.load=auto
    # (requeue) and no posttrain.ref_load (reference model) added.
    assert command.endswith(shlex.join(["srun", "--ntasks=16", "--ntasks-per-node=8", "--distribution=block",
                                        "--wait=60", "--label", sys.executable, "-m", "tools.eval", *user])), command
    assert "MASTER_ADDR=<first node>" in command and "OMP_NUM_THREADS=" in command  # the training rank env
    assert "world: 2 node(s) x 8 ranks = 16 ranks" in out
    assert "TP=1 PP=1 | 16 data-parallel replica(s)" in out
    assert "tasks: math_synth, code_synth | k=2" in out and f"report: {tmp_path}/report.json" in out
    assert not (tmp_path / "report.json").exists()  # a dry run evaluates nothing
    assert "eval" not in launch.stages.names()  # not a training stage (megatron_ext.train refuses it)


@pytest.mark.parametrize("args, message", [
    (["eval.tasks=[math_synth]"], "tools.eval needs checkpoint.load=DIR"),
    (["checkpoint.load={ckpt}", "eval.tasks=[gsm9k]"], "eval.tasks: 'gsm9k' is neither a task"),
    (["checkpoint.load={ckpt}", "eval.taks=[math_synth]"], "unknown config key eval.taks"),
    (["checkpoint.load={ckpt}", "eval.k=4"], "need eval.temperature > 0"),
    (["checkpoint.load={ckpt}/none"], "no such checkpoint directory"),
    (["checkpoint.load={ckpt}", "parallel.tp=3"], "world size 8 is not a multiple of parallel.tp * parallel.pp = 3"),
])
def test_dry_run_rejects_bad_eval_configs(capsys, tmp_path, args, message):
    """Checked the way tools.eval checks before loading a model; the checkpoint here is an
    empty directory, which only the checks after the eval section reach."""
    code, out, err = dry_run(capsys, "stage=eval", *[a.format(ckpt=tmp_path) for a in args])
    assert code == 2
    assert message in err, err
    assert "command:" not in out


# ---------------------------------------------------------------- real Slurm



def submit(cluster, name, args):
    """sbatch the real template from the repository root, as a user would; return the job id."""
    env = dict(cluster.env, PYTHON=sys.executable)
    res = cluster.run(["sbatch", "--parsable", *CPU_SBATCH, f"--job-name={name}",
                       f"--output={cluster.work}/%x-%j.log", "slurm/train.sbatch", *args], cwd=REPO, env=env)
    return res.stdout.strip().split(";")[0]


def job_log(cluster, name, job_id) -> str:
    path = cluster.work / f"{name}-{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def steps(text):
    return [(int(m.group(1)), float(m.group(3))) for m in STEP.finditer(text)]


def test_sbatch_trains_and_checkpoints(cluster):
    ckpt = cluster.work / "ckpt-train"
    job = submit(cluster, "train", ["stage=pretrain", "train.steps=4", "checkpoint.save_interval=2",
                                    f"checkpoint.dir={ckpt}", *CPU_RUN])
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    log = job_log(cluster, "train", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "world: 1 node(s) x 2 ranks = 2 ranks (CPU, gloo)" in log
    assert "process group: backend=gloo rank=0 world_size=2" in log
    losses = steps(log)
    assert [s for s, _ in losses] == [1, 2, 3, 4], log[-3000:]
    assert all(0 < loss < 20 for _, loss in losses)  # finite, near ln(vocab) ~ 11.9 at the start
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert (ckpt / "iter_0000002" / "meta.json").is_file() and (ckpt / "iter_0000004" / "meta.json").is_file()


def test_preemption_signal_saves_requeues_and_resumes(cluster):
    ckpt = cluster.work / "ckpt-preempt"
    total = 20  # long enough that the signal, sent once step 2 is logged, lands mid-run
    job = submit(cluster, "preempt", ["stage=pretrain", f"train.steps={total}", f"checkpoint.dir={ckpt}", *CPU_RUN])
    deadline = time.time() + 240
    while not any(s >= 2 for s, _ in steps(job_log(cluster, "preempt", job))):
        assert time.time() < deadline, job_log(cluster, "preempt", job)[-3000:]
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_log(cluster, "preempt", job)[-3000:]
        time.sleep(0.25)
    # What Slurm does 120 s before the time limit (--signal=USR1@120), sent by hand.
    cluster.run(["scancel", "--signal=USR1", job])

    # The ranks save and exit 75; the batch script requeues; Slurm holds a requeued job for
    # about two minutes (BeginTime) before it may start again. Wait for that state, check the
    # saved checkpoint, then let it start sooner than in two minutes.
    deadline = time.time() + 180
    while True:
        info = cluster.job(job)
        if info["JobState"] == "PENDING" and info["Restarts"] == "1":
            break
        assert info["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING"), \
            (info["JobState"], job_log(cluster, "preempt", job)[-3000:])
        assert time.time() < deadline, job_log(cluster, "preempt", job)[-3000:]
        time.sleep(0.5)
    first = job_log(cluster, "preempt", job)
    saved_at = max(s for s, _ in steps(first))
    assert saved_at < total, "the run finished before the signal arrived; nothing was preempted"
    assert "received SIGUSR1: will save and exit at the next step boundary" in first
    assert "training saved a checkpoint and exited 75: requeueing job" in first
    assert (ckpt / "latest").read_text().strip() == f"iter_{saved_at:07d}"
    assert [p.name for p in ckpt.glob("iter_*")] == [f"iter_{saved_at:07d}"]

    # Starting it again the moment it is requeued fails ("Job credential revoked": slurmd
    # revoked this job id's credential at the requeue, with one-second granularity), which is
    # what Slurm's hold guards against. Wait for the node to be idle and a little more.
    cluster.wait_idle(60)
    time.sleep(2)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    log = job_log(cluster, "preempt", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "1"
    assert log.startswith(first)  # --open-mode=append: the first run's log is kept
    second = log[len(first):]
    assert "run 2 on" in second
    assert f"resumed from {ckpt / f'iter_{saved_at:07d}'} at step {saved_at}" in second
    assert [s for s, _ in steps(second)] == list(range(saved_at + 1, total + 1)), second[-3000:]
    assert (ckpt / "latest").read_text().strip() == f"iter_{total:07d}"


def test_layout_that_does_not_fit_fails_before_srun(cluster):
    job = submit(cluster, "badlayout", ["parallel.tp=4", *CPU_RUN])  # 2 tasks cannot hold TP=4
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=180)
    log = job_log(cluster, "badlayout", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log[-2000:])
    assert "world size 2 is not divisible by parallel.tp*pp*cp = 4*1*1 = 4" in log
    assert "command:" not in log and "process group" not in log  # no srun step started
    assert info["Restarts"] == "0"


def test_sbatch_evaluates_a_checkpoint(cluster, tiny_checkpoint):
    """stage=eval through the real template: tools.eval on 2 ranks (two data-parallel replicas)
    writes the report; nothing is requeued."""
    report = cluster.work / "eval-report.json"
    job = submit(cluster, "eval", ["stage=eval", f"checkpoint.load={tiny_checkpoint}",
                                   "eval.tasks=[math_synth,code_synth]", "eval.limit=2", "eval.max_new_tokens=2",
                                   f"eval.out={report}"])
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    log = job_log(cluster, "eval", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "0"
    assert "-m tools.eval" in log and "checkpoint.load=auto" not in log
    # Both ranks ran one evaluation together: rank 1 loaded the model (its lines are there) and
    # only rank 0 printed the table and wrote the report (each rank alone would print its own).
    assert "\n1: " in log and "\n1: | task" not in log and "\n1: report:" not in log, log[-3000:]
    assert "\n0: | math_synth | 2 " in log and f"\n0: report: {report}" in log
    data = json.loads(report.read_text())
    assert list(data["tasks"]) == ["math_synth", "code_synth"]
    for name, task in data["tasks"].items():
        assert task["problems"] == len(task["items"]) == 2, name
        assert all(len(it["completions"]) == 1 for it in task["items"]), name


def test_recipe_chains_its_steps_with_afterok(cluster):
    """tools.recipe --executor slurm: one job per step, each after the previous one succeeded;
    the training step runs through slurm/launch.py inside its job."""
    out = cluster.work / "recipe"
    env = dict(cluster.env)
    res = cluster.run([sys.executable, "-m", "tools.recipe", "--out", str(out), "--executor", "slurm",
                       "--until", "cpt", "--sbatch-arg=--cpus-per-task=1", "cpt:train.steps=1",
                       "cpt:data.seq_length=32", "cpt:train.global_batch_size=2", "cpt:train.micro_batch_size=1"],
                      cwd=REPO, env=env, timeout=120)
    jobs = re.findall(r"\[recipe\] (\w+): job (\d+)", res.stdout)
    assert [step for step, _ in jobs] == ["data", "cpt"], res.stdout + res.stderr
    assert cluster.job(jobs[1][1]).get("Dependency", "").startswith(f"afterok:{jobs[0][1]}")
    for step, job in jobs:
        info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=600)
        logs = "".join(p.read_text(errors="replace") for p in (out / "logs").glob("*"))
        assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert json.loads((out / "cpt" / "summary.json").read_text())["steps"] == 1
    assert (out / "data" / "summary.json").is_file()
