"""`python -m megatron_ext.train [key=value ...]`: the main pretraining job.

Works as a single process, under `torchrun --nproc_per_node N`, or under Slurm's srun.
The config is composed and validated before any process group exists.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from megatron_ext import dist, fault
from megatron_ext.cli import config_yaml, fail, load_config, split_flags
from megatron_ext.config import ConfigError, validate
from megatron_ext.metrics import setup_console_logging

log = logging.getLogger("megatron_ext.train")


def run(argv, make_stage: Callable, name: str = "pretrain", base_overrides: Sequence[str] = ()) -> int:
    """The shared entry of every stage: compose + validate the config (before any process
    group), build the stage with `make_stage(cfg)` (may raise ConfigError), train, exit code.

    Exit codes: 0 done, 1 a checkpoint or non-finite error (logged), 2 a bad config or flag,
    75 preempted after saving (megatron_ext.fault.REQUEUE_EXIT_CODE).
    """
    fault.preemption_watcher()  # before anything slow: a pre-kill signal must not be lost
    flags, overrides = split_flags(sys.argv[1:] if argv is None else argv)
    unknown = [f for f in flags if f not in ("--print-config",)]
    if unknown:
        fail(f"unknown flag(s) {unknown}; pass config changes as key=value overrides")
    setup_console_logging()
    try:
        given = {o.split("=", 1)[0] for o in overrides}
        cfg = load_config([o for o in base_overrides if o.split("=", 1)[0] not in given] + list(overrides))
        validate(cfg, dist.launch_env().world_size)
        stage = make_stage(cfg)
    except ConfigError as e:
        fail(str(e))
    if "--print-config" in flags:
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
        log.info("done: %s loss %.4f -> %.4f over %d steps", name, history[0]["loss"], history[-1]["loss"],
                 len(history))
    return 0


def main(argv=None) -> int:
    from megatron_ext.pretrain import PretrainStage

    return run(argv, lambda cfg: PretrainStage())


if __name__ == "__main__":
    sys.exit(main())
