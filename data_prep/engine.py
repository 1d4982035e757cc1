"""Running `data_prep` pipelines on datatrove's executors: locally or as Slurm task arrays.

A pipeline is a list of stages `(name, [datatrove block], tasks)`; each stage becomes one
executor that depends on the one before (`LocalPipelineExecutor`: a process pool on this
machine; `SlurmPipelineExecutor`: one `sbatch --array` per stage, `afterok` on the previous).
Every task leaves a completion marker under LOGS/STAGE/completions/, so running the same command
again runs only what did not finish.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence


@dataclass
class SlurmOptions:
    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 4
    qos: str = ""
    env_command: str = ""
    sbatch_args: Dict[str, str] = field(default_factory=dict)
    job_prefix: str = "data"


def add_slurm_args(p: argparse.ArgumentParser, job_prefix: str) -> None:
    g = p.add_argument_group("slurm (--executor slurm)")
    g.add_argument("--partition", default="", help="Slurm partition (required with --executor slurm)")
    g.add_argument("--time", default="24:00:00", help="time limit per task")
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument("--mem-per-cpu-gb", type=int, default=4)
    g.add_argument("--qos", default="", help="quality of service (none by default)")
    g.add_argument("--env-command", default="", help="shell line that sets up Python in a job "
                   "(default: source this interpreter's bin/activate)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra '#SBATCH --KEY=VALUE' line (repeatable), e.g. account=proj")
    g.add_argument("--job-name", default=job_prefix, help="prefix of the Slurm job names")


def slurm_options(a: argparse.Namespace) -> SlurmOptions:
    sbatch = {}
    for kv in a.sbatch_arg:
        key, _, value = kv.partition("=")
        if not key or key.startswith("-"):
            raise ValueError(f"--sbatch-arg {kv!r}: expected KEY=VALUE without leading dashes, e.g. account=proj")
        sbatch[key] = value
    return SlurmOptions(a.partition, a.time, a.cpus_per_task, a.mem_per_cpu_gb, a.qos, a.env_command, sbatch,
                        a.job_name)


def check_executor(executor: str, tasks: int, slurm: Optional[SlurmOptions]) -> None:
    if tasks < 1:
        raise ValueError(f"--tasks {tasks}: must be >= 1")
    if executor == "slurm" and not (slurm and slurm.partition):
        raise ValueError("--executor slurm needs --partition")


def make_executors(pipelines: Sequence[tuple], logs_root: Path, executor: str, workers: int,
                   slurm: Optional[SlurmOptions], slurm_logs: Optional[Path] = None) -> list:
    """One datatrove executor per stage, each depending on the one before."""
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

    executors, prev = [], None
    for name, pipeline, n in pipelines:
        logs = str(logs_root / name)
        if executor == "local":
            ex = LocalPipelineExecutor(pipeline, tasks=n, workers=max(1, min(workers, n)), logging_dir=logs,
                                       depends=prev)
        else:
            env = slurm.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}"
            ex = SlurmPipelineExecutor(pipeline, tasks=n, time=slurm.time, partition=slurm.partition,
                                       cpus_per_task=slurm.cpus_per_task, mem_per_cpu_gb=slurm.mem_per_cpu_gb,
                                       job_name=f"{slurm.job_prefix}-{name}", qos=slurm.qos, env_command=env,
                                       logging_dir=logs, depends=prev, sbatch_args=dict(slurm.sbatch_args),
                                       slurm_logs_folder=str((slurm_logs or logs_root / "slurm") / name),
                                       mail_type="NONE")
        executors.append(ex)
        prev = ex
    return executors


def run_pipelines(pipelines: Sequence[tuple], logs_root: Path, executor: str, workers: int,
                  slurm: Optional[SlurmOptions]) -> Dict[str, str]:
    """Run every stage here (local) or submit them all (slurm; returns the job id per stage,
    -1 for a stage whose tasks had all completed)."""
    exs = make_executors(pipelines, logs_root, executor, workers, slurm)
    exs[-1].run()  # runs (local) or submits (slurm) the stages it depends on first
    return {name: str(ex.job_id) for (name, _, _), ex in zip(pipelines, exs)} if executor == "slurm" else {}


def dry_run(pipelines: Sequence[tuple], logs_root: Path, executor: str, workers: int,
            slurm: Optional[SlurmOptions]) -> str:
    """What would run: the stages, their task counts and, for Slurm, each stage's sbatch script."""
    lines: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        exs = make_executors(pipelines, Path(tmp) / "logs", executor, workers, slurm, Path(tmp) / "slurm")
        prev = None
        for (name, _, n), ex in zip(pipelines, exs):
            lines.append(f"stage {name}: {n} task(s)" + (f", after {prev} succeeded" if prev else ""))
            prev = name
            if executor == "slurm":
                script = ex.get_launch_file_contents(ex.get_sbatch_args(n), "srun -l -n 1 launch_pickled_pipeline "
                                                     f"{logs_root / name / 'executor.pik'}")
                script = script.replace(str(Path(tmp) / "slurm"), str(logs_root / "slurm"))
                lines += ["    " + ln for ln in script.splitlines()]
    return "\n".join(lines)


def failed_command(e: subprocess.CalledProcessError) -> str:
    """The one-line error of a command the executor ran (sbatch, a local task) that failed."""
    return f"{' '.join(map(str, e.cmd))} failed (exit {e.returncode}); see its message above"
