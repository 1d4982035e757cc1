"""What `checkpoint.load` means, decided once: a `LoadPlan`.

    checkpoint.load      plan kind    what is loaded
    (unset)              FRESH        nothing: initial weights, step 0
    auto                 AUTO         the newest good checkpoint in checkpoint.dir, else nothing
    DIR/iter_0000020     TRAINING     that training checkpoint
    DIR                  ROOT         the newest good training checkpoint under DIR
    CONVERTED_DIR        CONVERTED    a tools.convert model: weights only

`checkpoint.weights_only` keeps only the model weights of a training checkpoint (fresh
optimizer, schedule and data position); a converted model requires it.

Two steps, for the two kinds of reader: `parse_load` reads the config alone (a path is only
`PATH`: config validation, the reference model's default and the Slurm launcher, which may run
where the path does not exist yet); `resolve_load` also looks at the directory to tell the three
kinds of path apart, reading no file (training's `resume`). Which checkpoint under a root, and
whether its files are intact, is decided when loading (`resuming.find_resumable`, `store.verify`).
Megatron-Core is not imported here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_ext.checkpoint import paths
from megatron_ext.safe_pickle import CheckpointError


class LoadKind(enum.Enum):
    FRESH = "fresh"
    AUTO = "auto"
    PATH = "path"
    """A directory not looked at yet (`parse_load`): `resolve_load` makes it one of the three below."""
    TRAINING = paths.TRAINING
    ROOT = paths.ROOT
    CONVERTED = paths.CONVERTED


@dataclass(frozen=True)
class LoadPlan:
    """What a job starts from."""

    kind: LoadKind
    load: Optional[str] = None
    """`checkpoint.load` as given (None: unset)."""
    path: Optional[Path] = None
    """Where to look: checkpoint.dir for AUTO, the named directory for a path, None for FRESH."""
    weights_only: bool = False
    """Model weights only: fresh optimizer, schedule and data position (`checkpoint.weights_only`)."""

    @property
    def start_model(self) -> Optional[str]:
        """The checkpoint a user named to start from (as given), or None (FRESH, AUTO): the
        reference model's default, and what the Slurm launcher passes on to a requeued job."""
        return None if self.kind in (LoadKind.FRESH, LoadKind.AUTO) else self.load


def parse_load(c) -> LoadPlan:
    """The plan a checkpoint config (`load`, `dir`, `weights_only`) asks for, from the config
    alone: FRESH, AUTO or PATH. CheckpointError: `auto` without checkpoint.dir."""
    if not c.load:
        return LoadPlan(LoadKind.FRESH, weights_only=c.weights_only)
    if c.load == "auto":
        if not c.dir:
            raise CheckpointError("checkpoint.load=auto needs checkpoint.dir")
        return LoadPlan(LoadKind.AUTO, c.load, Path(c.dir), c.weights_only)
    return LoadPlan(LoadKind.PATH, c.load, Path(c.load), c.weights_only)


def resolve_load(c) -> LoadPlan:
    """`parse_load`, with a path identified (`paths.identify`: directory entries only, no file
    read) as TRAINING, ROOT or CONVERTED. CheckpointError names the value when the path is no
    directory or no checkpoint, or is a converted model without checkpoint.weights_only."""
    plan = parse_load(c)
    if plan.kind is not LoadKind.PATH:
        return plan
    if not plan.path.is_dir():
        raise CheckpointError(f"checkpoint.load={c.load}: no such directory")
    kind = LoadKind(paths.identify(plan.path))
    if kind is LoadKind.CONVERTED and not c.weights_only:
        raise CheckpointError(f"checkpoint.load={c.load} is a converted model (weights only): "
                              "set checkpoint.weights_only=true")
    return LoadPlan(kind, plan.load, plan.path, plan.weights_only)
