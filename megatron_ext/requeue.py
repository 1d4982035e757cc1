"""What a command that may run again adds to its overrides so that it resumes: a requeued Slurm
job (slurm/launch.py) and a rerun recipe step (tools.recipe) run the same command twice, so the
command itself must name its checkpoint directory and pick up its own progress."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from megatron_ext import stages
from megatron_ext.checkpoint.paths import complete_checkpoints
from megatron_ext.checkpoint.plan import LoadKind, LoadPlan, parse_load
from megatron_ext.cli import override_value
from megatron_ext.config import CheckpointConfig

CHECKPOINT_ROOT = "runs"  # default checkpoint.dir = runs/<job name>/checkpoints (git-ignored)


def _has_checkpoint(directory: str) -> bool:
    return bool(complete_checkpoints(Path(directory)))


def with_checkpoint_overrides(overrides: List[str], job_name: str) -> tuple:
    """Add the overrides requeue depends on; return (overrides, notes for the log).

    A requeued job runs the same command again, so the command itself must resume: it always
    names a checkpoint directory (derived from the job name unless given) and loads with
    `auto`. If the user named a checkpoint to start from (e.g. converted HF weights for CPT),
    that is used only until this job's own directory holds a checkpoint; after that the job's
    progress wins, with the full training state.
    """
    out, notes = list(overrides), []
    ckpt_dir = override_value(out, "checkpoint.dir")
    if ckpt_dir in (None, "", "null"):
        ckpt_dir = f"{CHECKPOINT_ROOT}/{job_name}/checkpoints"
        out.append(f"checkpoint.dir={ckpt_dir}")
        notes.append(f"checkpoint.dir={ckpt_dir} (from the job name)")
    plan = _load_plan(override_value(out, "checkpoint.load"), ckpt_dir)
    if plan.kind is LoadKind.FRESH:
        out.append("checkpoint.load=auto")
        return out, notes
    start = plan.start_model  # None: `auto` already
    if start and stages.info(override_value(out, "stage") or "pretrain").uses_reference_model \
            and override_value(out, "posttrain.ref_load") in (None, "", "null"):
        # After a requeue checkpoint.load becomes `auto`; the reference must stay the start model.
        out.append(f"posttrain.ref_load={start}")
        notes.append(f"posttrain.ref_load={start} (the reference model is the model the job starts from)")
    if start and _has_checkpoint(ckpt_dir):
        out += ["checkpoint.load=auto", "checkpoint.weights_only=false"]
        notes.append(f"{ckpt_dir} already holds this job's checkpoints: resuming from them "
                     f"(checkpoint.load=auto) instead of checkpoint.load={start}")
    return out, notes


def _load_plan(load: Optional[str], ckpt_dir: str) -> LoadPlan:
    """The `LoadPlan` of the user's checkpoint.load override (megatron_ext.checkpoint.plan): from
    the value alone, as the path may exist only on the compute nodes."""
    return parse_load(CheckpointConfig(load=None if load == "null" else load, dir=ckpt_dir))
