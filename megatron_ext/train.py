"""`python -m megatron_ext.train [stage=X] [key=value ...]`: the main job, any stage (default pretrain).

Works as a single process, under `torchrun --nproc_per_node N`, or under Slurm's srun.
The config is composed and validated before any process group exists.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_ext import dist, fault, stages
from megatron_ext.cli import (HELP_FLAGS, PRINT_CONFIG, config_yaml, fail, help_text, load_config, split_flags,
                              with_override)
from megatron_ext.config import ConfigError, validate
from megatron_ext.loggers import setup_console_logging

log = logging.getLogger("megatron_ext.train")


def entry(name: str) -> Tuple[str, Tuple[str, ...]]:
    """(the module users run, the stages it serves) of entry `name`: `pretrain` is
    `megatron_ext.train`, which runs every stage; another name is a stage whose `entry` module
    serves every stage that names the same entry (posttrain.cpt: cpt_math, cpt_code, long_context)."""
    rows = [row for row in stages.table() if row.trains]
    if name == "pretrain":
        return "megatron_ext.train", tuple(row.name for row in rows)
    module = stages.info(name).entry
    return module, tuple(row.name for row in rows if row.entry == module)


def _description(stages: Sequence[str], default: str) -> str:
    from megatron_ext.cli import CONF_DIR, yaml_comment

    if len(stages) == 1:
        what = yaml_comment(CONF_DIR / "stage" / f"{stages[0]}.yaml")
    else:
        what = f"Trains one of the stages {', '.join(stages)} (stage=..., listed below; default {default})."
    how = ("Composes conf/config.yaml with the stage's defaults (conf/stage/) and your overrides, validates "
           "every rule before any process group exists, then trains on the shared loop. Runs as one process, "
           "under `torchrun --nproc_per_node N -m ...`, or on Slurm through slurm/launch.py.")
    return what + "\n\n" + "\n".join(textwrap.wrap(how, 100))


def _print_help(name: str, base_overrides: Sequence[str], overrides: Sequence[str]) -> int:
    module, stages = entry(name)
    note = None
    try:
        cfg = load_config(with_override(base_overrides, overrides))
    except ConfigError as e:
        cfg = load_config(list(base_overrides))
        note = f"(defaults shown without your overrides, which were rejected: {e})"
    default = load_config(list(base_overrides)).stage  # the entry's own (posttrain.cpt: cpt_math), else config.yaml's
    print(help_text(f"python -m {module}", _description(stages, default), cfg, stages, note), end="")
    return 0


def run(argv, make_stage: Optional[Callable] = None, name: str = "pretrain", base_overrides: Sequence[str] = ()) -> int:
    """The shared entry of every stage: compose + validate the config (before any process
    group), build the stage (`make_stage(cfg)`, by default the registry's `stages.make`; may
    raise ConfigError), train, exit code.

    Flags: `-h/--help` prints what the entry does, its config groups and most used keys with
    their defaults; `--print-config` prints the composed config and exits.
    Exit codes: 0 done, 1 a checkpoint or non-finite error (logged), 2 a bad config or flag,
    75 preempted after saving (megatron_ext.fault.REQUEUE_EXIT_CODE).
    """
    flags, overrides = split_flags(sys.argv[1:] if argv is None else argv)
    unknown = [f for f in flags if f not in (PRINT_CONFIG, *HELP_FLAGS)]
    if unknown:
        module, _ = entry(name)
        fail(f"unknown flag(s) {unknown}; the flags are -h/--help and --print-config, config changes are "
             f"key=value overrides (python -m {module} --help)")
    if any(f in HELP_FLAGS for f in flags):
        return _print_help(name, base_overrides, overrides)
    fault.preemption_watcher()  # before anything slow: a pre-kill signal must not be lost
    setup_console_logging()
    try:
        cfg = load_config(with_override(base_overrides, overrides))
        _check_stage(cfg, name)
        validate(cfg, dist.launch_env().world_size)
        from megatron_ext.data import check_paths

        check_paths(cfg)  # before any model is built: a typo in data.paths costs seconds, not a queue wait
        stage = (make_stage or stages.make)(cfg)
        if cfg.eval.train_tasks:
            stages.resolve(cfg.eval.train_hook, "eval.train_hook")  # a typo fails here, not after the build
    except ConfigError as e:
        fail(str(e))
    if PRINT_CONFIG in flags:
        print(config_yaml(cfg))
        return 0
    from megatron_ext.checkpoint import CheckpointError
    from megatron_ext.loop import train

    try:
        history = train(cfg, stage).history
    except (CheckpointError, fault.NonFiniteError) as e:
        log.error("%s", e)
        return 1
    finally:
        dist.destroy()
    if history and history[0]["loss"] is not None:
        log.info("done: %s loss %.4f -> %.4f over %d steps", cfg.stage, history[0]["loss"], history[-1]["loss"],
                 len(history))
    return 0


def _check_stage(cfg, name: str) -> None:
    """A posttrain.X entry runs stage X: refuse another stage= there (it would train X's objective
    on that stage's config); `python -m megatron_ext.train stage=...` runs any stage."""
    module, served = entry(name)
    if cfg.stage not in served:
        raise ConfigError(f"stage={cfg.stage} is not run by python -m {module} (it runs "
                          f"{', '.join(served)}); use python -m megatron_ext.train stage={cfg.stage}")


def run_stage(name: str, argv=None) -> int:
    """`python -m <entry of stage name>`: `run` with the stage's config as the base."""
    return run(argv, name=name, base_overrides=[f"stage={name}"])


def main(argv=None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
