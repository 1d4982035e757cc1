"""The frozen reference model of DPO and GRPO (run it with `megatron_ext.forward.forward_only`).

Which weights: `posttrain.ref_load` if set; else `checkpoint.load` when it names a path (the
model this run starts from, e.g. an SFT checkpoint). Either may be a training checkpoint, its
root or a tools.convert checkpoint, read by `megatron_ext.checkpoint.load_weights`. Else the
policy's initial weights, kept as a snapshot when the stage's `customize_model` hook sees each
chunk (initialisation is deterministic from train.seed, so a resumed run rebuilds the same
reference).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from megatron_ext.checkpoint.plan import parse_load
from megatron_ext.forward import frozen
from megatron_ext.config import Config

log = logging.getLogger(__name__)


class Reference:
    """Builds the reference chunks on first use, from the configured weights."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.snapshots: List[Dict[str, torch.Tensor]] = []
        self.chunks: Optional[List[torch.nn.Module]] = None

    def source(self) -> Optional[str]:
        """The checkpoint to load, or None for the initial-weights snapshot."""
        return self.cfg.posttrain.ref_load or parse_load(self.cfg.checkpoint).start_model

    def snapshot(self, chunk, cfg: Config) -> None:
        """Stage hook: remember a chunk's initial weights (only when no checkpoint is named)."""
        if self.source() is None:
            self.snapshots.append({k: v.detach().clone() for k, v in chunk.state_dict().items()
                                   if isinstance(v, torch.Tensor)})

    def build(self) -> List[torch.nn.Module]:
        """The frozen reference chunks (this rank's pipeline stage(s)), in eval mode."""
        if self.chunks is not None:
            return self.chunks
        from megatron_ext.build import build_model
        from megatron_ext.checkpoint import load_weights
        from megatron_ext.transformer import transformer_config

        tcfg = transformer_config(self.cfg)
        tcfg.perform_initialization = False  # weights come from a checkpoint or the snapshot
        chunks = build_model(self.cfg, tcfg)
        src = self.source()
        if src is not None:
            load_weights(chunks, src, self.cfg.model)
            log.info("reference model: weights from %s", src)
        else:
            for chunk, state in zip(chunks, self.snapshots):
                chunk.load_state_dict(state, strict=False)
            log.info("reference model: the policy's initial weights")
        self.chunks = frozen(chunks)
        return chunks
