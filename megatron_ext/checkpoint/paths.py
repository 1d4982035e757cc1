"""The names both checkpoint kinds have on disk, and telling the kinds apart without reading a file.

A training root (`checkpoint.dir`) holds `iter_NNNNNNN/` directories (one training checkpoint
each, `megatron_ext.checkpoint.store`) and a `latest` pointer; a converted checkpoint (written by
`python -m tools.convert hf-to-mcore`, `megatron_ext.checkpoint.sources`) holds `CONVERTED_META`.
Nothing here imports Megatron-Core, so config validation and the Slurm launcher can plan a load
(`megatron_ext.checkpoint.plan`) without loading it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Union

from megatron_ext.safe_pickle import CheckpointError

ITER = re.compile(r"^iter_(\d{7})$")
"""The directory name of one committed training checkpoint (its step, 7 digits)."""
# Written by tools.convert (hf-to-mcore): the model's sharded state dict at the top level of a
# dist_checkpointing directory, plus this metadata file with the ModelConfig it holds.
CONVERTED_META = "qwen_checkpoint.json"
TOKENIZER_DIR = "hf_tokenizer"

CONVERTED, ROOT, TRAINING = "converted", "root", "training"
"""What `identify` calls a checkpoint directory."""


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def complete_checkpoints(root: Path) -> List[Path]:
    """Committed checkpoint directories, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and ITER.match(p.name))


def identify(path: Union[str, Path]) -> str:
    """What a checkpoint directory is: "converted" (tools.convert output), "root" (a training
    `checkpoint.dir`: `iter_N` directories and/or `latest`) or "training" (one `iter_N`, or any
    directory with a meta.json). Reads no file; CheckpointError names a path that is none of these."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / CONVERTED_META).is_file():
        return CONVERTED
    if complete_checkpoints(path) or (path / "latest").exists():
        return ROOT
    if (path / "meta.json").is_file():
        return TRAINING
    raise CheckpointError(f"{path} is not a checkpoint: no {CONVERTED_META} (tools.convert), no meta.json "
                          "(training checkpoint iter_N) and no iter_N directories or `latest` (training root)")
