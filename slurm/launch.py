"""Launch one training stage, or an evaluation, on a Slurm allocation: one srun task per GPU, each task one rank.

Called by `slurm/train.sbatch` inside a job; also runs anywhere as a dry run:

    python slurm/launch.py --dry-run --nodes 2 stage=pretrain model=qwen3_8b parallel.tp=4
    python slurm/launch.py --dry-run stage=eval checkpoint.load=runs/sft/checkpoints \
        'eval.tasks=[math_synth]' eval.out=report.json

For a training stage it adds the checkpoint overrides that make requeue work (`checkpoint.dir`
derived from the job name unless given, `checkpoint.load=auto`), composes and validates the
config for the allocation's world size with the same code the training entry uses, and
constructs the stage so its own rules apply. `stage=eval` is not a training stage: srun runs
`python -m tools.eval` with the other overrides as given (no requeue overrides, no reference
model), after checking the eval config and the checkpoint the way tools.eval does. Then it prints
the command, the layout per node and the config, and (unless `--dry-run`) replaces itself with
`srun`. Its exit code is srun's: 75 means "saved after a preemption signal, requeue me" (the
sbatch script acts on it, for training only), 2 means the config or the layout was rejected
before anything was launched.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: import the project next to it
    sys.path.insert(0, str(REPO))

from megatron_ext.cli import config_yaml, load_config, override_key, override_value  # noqa: E402
from megatron_ext import stages  # noqa: E402
from megatron_ext.config import Config, ConfigError, ParallelConfig, validate  # noqa: E402
from megatron_ext.layout import Layout  # noqa: E402
from megatron_ext.requeue import CHECKPOINT_ROOT, with_checkpoint_overrides  # noqa: E402

ENTRY = "megatron_ext.train"
"""The module srun runs for every training stage (`python -m megatron_ext.train stage=X ...`):
stages come from the table (megatron_ext.stages), so a stage added there needs nothing here."""

EVAL_STAGE, EVAL_ENTRY = stages.EVAL.name, stages.EVAL.entry
"""`stage=eval` (the table's one job that does not train) runs `python -m tools.eval` on the
ranks (there is no conf/stage/eval.yaml: evaluation composes the default config plus `eval.*`)."""

DEFAULT_JOB_NAME = "qwen-train"


@dataclass
class Allocation:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    job_name: str
    hosts: Optional[List[str]] = None  # None in a dry run outside a job
    cpus_per_task: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class LaunchError(Exception):
    """The request cannot be launched on this allocation; the message says why."""


def _count(value: str) -> int:
    """Slurm counts like `8`, `8(x2)` or `8,8` (one entry per node group): the first count."""
    return int(value.split("(")[0].split(",")[0])


def allocation_from_slurm(env: Dict[str, str]) -> Allocation:
    """The allocation of the job this runs in (srun-native: SLURM_NTASKS ranks, block-placed)."""
    if "SLURM_NTASKS" not in env:
        raise LaunchError("the job has no task count: submit with --ntasks-per-node (one task per GPU)")
    nodes = int(env["SLURM_JOB_NUM_NODES"])
    ntasks = int(env["SLURM_NTASKS"])
    if ntasks % nodes:
        raise LaunchError(f"SLURM_NTASKS={ntasks} is not a multiple of the {nodes} nodes; "
                          "ask for --ntasks-per-node so every node runs the same number of ranks")
    gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "0"
    gpus = gpus.split(":")[-1]  # --gpus-per-node=h100:8 -> "h100:8"
    hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                           check=True, capture_output=True, text=True).stdout.split()
    cpus = env.get("SLURM_CPUS_PER_TASK")
    return Allocation(nodes=nodes, tasks_per_node=ntasks // nodes, gpus_per_node=_count(gpus),
                      job_name=env.get("SLURM_JOB_NAME", DEFAULT_JOB_NAME), hosts=hosts,
                      cpus_per_task=int(cpus) if cpus else None)


def is_eval(overrides: Sequence[str]) -> bool:
    return override_value(overrides, "stage") == EVAL_STAGE


def resolve(overrides: List[str], alloc: Allocation) -> tuple:
    """(module, overrides, config, notes) for this allocation; ConfigError/LaunchError if it doesn't fit."""
    stage = override_value(overrides, "stage") or "pretrain"
    if stage not in (row.name for row in stages.table()):
        raise LaunchError(f"stage={stage} has no conf/stage/{stage}.yaml; the stages are {', '.join(stages.names())}"
                          f" (and stage={EVAL_STAGE} evaluates a checkpoint with python -m {EVAL_ENTRY})")
    if alloc.gpus_per_node and alloc.tasks_per_node > alloc.gpus_per_node:
        raise LaunchError(f"{alloc.tasks_per_node} tasks per node but {alloc.gpus_per_node} GPUs per node: "
                          "one rank per GPU needs --ntasks-per-node <= --gpus-per-node")
    if not stages.info(stage).trains:
        return resolve_eval(overrides, alloc)
    overrides, notes = with_checkpoint_overrides(overrides, alloc.job_name)
    cfg = load_config(overrides)
    validate(cfg, alloc.world_size, check_device=False)  # the ranks check their devices
    stages.make(cfg)  # the stage's own rules, as the ranks will apply them
    return ENTRY, overrides, cfg, notes


def resolve_eval(overrides: List[str], alloc: Allocation) -> tuple:
    """`stage=eval`: the overrides tools.eval gets (the user's, less `stage=`), checked by
    tools.eval's own pre-flight for this world size (every rank beyond TP x PP is a data-parallel
    replica sampling a share of the problems)."""
    from tools.eval import check_config

    overrides = [o for o in overrides if "=" not in o or override_key(o) != "stage"]
    cfg = load_config(overrides)
    try:
        check_config(cfg, alloc.world_size)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, or a checkpoint that does not open
        raise LaunchError(str(e)) from None
    return EVAL_ENTRY, overrides, cfg, []


def eval_lines(cfg: Config, alloc: Allocation) -> List[str]:
    """What the evaluation runs where: world, model layout and replicas, tasks and sampling."""
    p, e, world, tpn = cfg.parallel, cfg.eval, alloc.world_size, alloc.tasks_per_node
    # tools.eval builds the model at parallel.tp and parallel.pp only; a replica is a DP rank
    lay = Layout.of(Config(parallel=ParallelConfig(tp=p.tp, pp=p.pp)), world)
    replica = {r: group.index(r) for group in lay.rank_groups()["dp"] for r in group}
    lines = [
        f"world: {alloc.nodes} node(s) x {tpn} ranks = {world} ranks"
        + (f" (one GPU each, {alloc.gpus_per_node} GPUs per node)" if alloc.gpus_per_node else " (CPU, gloo)"),
        f"eval: checkpoint {cfg.checkpoint.load} | TP={p.tp} PP={p.pp} | {lay.dp} data-parallel "
        "replica(s), each sampling a share of the problems",
        f"tasks: {', '.join(e.tasks)} | k={e.k} samples/problem={e.num_samples or e.k} temperature={e.temperature} "
        f"limit={e.limit} max_new_tokens={e.max_new_tokens}"
        + (f" | rm_load={e.rm_load}" if e.rm_load else "") + (f" | prm_load={e.prm_load}" if e.prm_load else ""),
        f"report: {e.out or '- (eval.out not set: only the printed table)'}",
    ]
    for node in range(alloc.nodes):
        ranks = range(node * tpn, (node + 1) * tpn)
        host = f" {alloc.hosts[node]}" if alloc.hosts else ""
        lines.append(f"node {node}{host}: ranks {_span(ranks)} | replica {_span(replica[r] for r in ranks)}")
    return lines


def _span(values) -> str:
    values = sorted(set(values))
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def layout_lines(cfg: Config, alloc: Allocation) -> List[str]:
    """The world layout: sizes, then per node its ranks, pipeline stages and DP replicas, and
    which communication groups stay inside a node (Megatron-Core's own rank generator, with
    the default order tp-cp-ep-dp-pp, decides the groups)."""
    p, world, tpn = cfg.parallel, alloc.world_size, alloc.tasks_per_node
    lay = Layout.of(cfg, world)
    dp, etp, edp, ranks_of = lay.dp, lay.etp, lay.edp, lay.rank_groups()
    t = cfg.train
    lines = [
        f"world: {alloc.nodes} node(s) x {tpn} ranks = {world} ranks"
        + (f" (one GPU each, {alloc.gpus_per_node} GPUs per node)" if alloc.gpus_per_node else " (CPU, gloo)"),
        f"parallel: TP={p.tp} PP={p.pp}" + (f" (VPP={p.vpp})" if p.vpp else "") + f" CP={p.cp} DP={dp}"
        + f" SP={'on' if p.sp else 'off'}" + (f" | experts: EP={p.ep} ETP={etp} expert-DP={edp}" if cfg.model.is_moe else ""),
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x DP {dp} x "
        f"{lay.microbatches} micro-batches per step, seq {cfg.data.seq_length}",
    ]
    node_of = lambda r: r // tpn  # noqa: E731  srun --distribution=block
    groups = {kind.upper(): ranks_of[kind] for kind in ("tp", "cp", "dp", "pp")}
    if cfg.model.is_moe:
        groups["EP"] = ranks_of["ep"]
    coords = {}
    for kind in ("tp", "cp", "dp", "pp"):
        for group in ranks_of[kind]:
            for index, rank in enumerate(group):
                coords.setdefault(rank, {})[kind] = index
    for node in range(alloc.nodes):
        ranks = range(node * tpn, (node + 1) * tpn)
        host = f" {alloc.hosts[node]}" if alloc.hosts else ""
        lines.append(f"node {node}{host}: ranks {_span(ranks)} | PP stage {_span(coords[r]['pp'] for r in ranks)}"
                     f" | DP replica {_span(coords[r]['dp'] for r in ranks)}"
                     f" | TP rank {_span(coords[r]['tp'] for r in ranks)}")
    inside = [k for k, g in groups.items() if len(g[0]) > 1 and all(len({node_of(r) for r in x}) == 1 for x in g)]
    across = [k for k, g in groups.items() if len(g[0]) > 1 and k not in inside]
    lines.append(f"groups inside one node: {', '.join(inside) or '-'}; across nodes: {', '.join(across) or '-'}")
    for kind in ("TP", "CP", "EP"):
        if kind in across and alloc.gpus_per_node:
            lines.append(f"warning: {kind} groups span nodes, so their traffic leaves NVLink "
                         f"(keep {kind} size within {tpn} ranks per node)")
    return lines


def srun_command(module: str, overrides: List[str], alloc: Allocation) -> List[str]:
    cmd = ["srun", f"--ntasks={alloc.world_size}", f"--ntasks-per-node={alloc.tasks_per_node}",
           "--distribution=block",  # ranks 0..n-1 on node 0, ...: TP groups stay on one node
           # Once one rank has ended, the others get 60 s to end too, then they are killed: a
           # crashed rank does not leave the rest hanging in a collective. Not
           # --kill-on-bad-exit: after a preemption save every rank exits 75, and that would
           # kill the slower ranks and turn srun's 75 into 143 (no requeue).
           "--wait=60",
           "--label"]  # prefix every line with its rank
    if alloc.cpus_per_task:
        cmd.append(f"--cpus-per-task={alloc.cpus_per_task}")  # srun 22.05+ no longer inherits it
    return cmd + [sys.executable, "-m", module] + overrides


def rendezvous_env(env: Dict[str, str], alloc: Allocation) -> Dict[str, str]:
    """MASTER_ADDR/PORT for torch.distributed: the first node of the allocation (never an
    inherited MASTER_ADDR: sbatch passes the submitting shell's environment on), and a port
    fixed per job id (the same after a requeue; --exclusive keeps other jobs off the node)
    unless MASTER_PORT is set."""
    out = {}
    out["MASTER_ADDR"] = alloc.hosts[0] if alloc.hosts else "<first node>"
    job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + job_id % 20000)
    # One rank per core budget; torch would otherwise start one thread per core in every rank.
    out["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or str(alloc.cpus_per_task or 1)
    # Step lines reach the job log as they happen, not when a buffer fills (tail -f works).
    out["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED") or "1"
    return out


def help_epilog() -> str:
    """The part of --help after the flags: stages and their modules, config groups, the most
    used keys with their defaults, how overrides work, what the launcher adds, exit codes."""
    from megatron_ext.cli import config_help

    lines = ["Everything else is a Hydra override (key=value), e.g. stage=pretrain model=qwen3_8b parallel.tp=4.",
             "", f"srun runs `python -m {ENTRY} stage=X ...` (`... stage=X --help` shows that stage's defaults); "
             "the stages (conf/stage/):"]
    lines += [f"  stage={row.name:<13} {row.stage_class}" for row in stages.table() if row.trains]
    pad = " " * 22
    lines += [f"  stage={EVAL_STAGE:<13} not a training stage: srun runs `python -m {EVAL_ENTRY} ...` with the other",
              f"{pad}overrides (checkpoint.load=DIR, eval.tasks=[...], eval.k, eval.limit, eval.temperature,",
              f"{pad}eval.out=FILE.json; `python -m {EVAL_ENTRY} --help` lists them). Nothing is added for",
              f"{pad}requeue, and the job is not requeued. E.g. stage=eval checkpoint.load=runs/sft/checkpoints",
              f"{pad}'eval.tasks=[math_synth]' eval.out=report.json"]
    lines += ["", config_help(load_config([]), keys_title="Most used keys, with their defaults for stage=pretrain:"),
              "",
              f"Added for requeue (training stages): checkpoint.dir={CHECKPOINT_ROOT}/<job name>/checkpoints unless "
              "given, and checkpoint.load=auto\n  (a checkpoint.load=PATH is used until the job's own directory holds "
              "a checkpoint).",
              "Exit codes: srun's (75: saved after a preemption signal, requeue); 2: the config, the layout or "
              "(stage=eval)\n  the checkpoint was rejected before anything was launched."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]):
    argv = list(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = argparse.ArgumentParser(
        prog="slurm/launch.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=help_epilog() if wants_help else None)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command, layout and config; launch nothing")
    parser.add_argument("--nodes", type=int, help="dry run outside a job: number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help="dry run outside a job: GPUs per node (default 8)")
    parser.add_argument("--tasks-per-node", type=int, help="dry run outside a job: ranks per node "
                        "(default: one per GPU)")
    parser.add_argument("--job-name", help=f"dry run outside a job: job name (default {DEFAULT_JOB_NAME})")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return parser.parse_args(argv)


def _allocation(args, env: Dict[str, str]) -> Allocation:
    sizing = [f"--{n.replace('_', '-')}" for n in ("nodes", "gpus_per_node", "tasks_per_node", "job_name")
              if getattr(args, n) is not None]
    if "SLURM_JOB_ID" in env and not args.dry_run:
        if sizing:
            raise LaunchError(f"{', '.join(sizing)} only apply to a dry run; inside a job the allocation "
                              "decides (sbatch --nodes/--ntasks-per-node/--gpus-per-node)")
        return allocation_from_slurm(env)
    if "SLURM_JOB_ID" in env and not sizing:
        return allocation_from_slurm(env)
    gpus = 8 if args.gpus_per_node is None else args.gpus_per_node
    tpn = args.tasks_per_node or gpus
    if tpn < 1 or (args.nodes is not None and args.nodes < 1):
        raise LaunchError("--nodes and --tasks-per-node must be >= 1 (give --tasks-per-node with --gpus-per-node 0)")
    return Allocation(nodes=args.nodes or 1, tasks_per_node=tpn, gpus_per_node=gpus,
                      job_name=args.job_name or DEFAULT_JOB_NAME)


def main(argv: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
    try:
        if bad:
            raise LaunchError(f"not a key=value override: {' '.join(bad)}")
        alloc = _allocation(args, env)
        module, overrides, cfg, notes = resolve(args.overrides, alloc)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = srun_command(module, overrides, alloc)
    rdzv = rendezvous_env(env, alloc)
    print("command:", " ".join(f"{k}={v}" for k, v in rdzv.items()), shlex.join(cmd))
    for line in notes:
        print("note:", line)
    if module == EVAL_ENTRY:
        from omegaconf import OmegaConf

        for line in eval_lines(cfg, alloc):
            print(line)
        print("config (eval):\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg.eval)), flush=True)
    else:
        for line in layout_lines(cfg, alloc):
            print(line)
        print("config:\n" + config_yaml(cfg), flush=True)
    if args.dry_run:
        return 0
    os.execvpe(cmd[0], cmd, {**env, **rdzv})  # srun's exit code becomes this process's
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
