"""The parallel layout of a run: every size derived from the parallel config, the batch sizes and
the world size, computed in one place.

Megatron-Core (`parallel_state.initialize_model_parallel`) lays the world out twice, with the
default order tp-cp-ep-dp-pp:
- dense layers: TP x CP x DP x PP, so the world must be a multiple of TP*PP*CP and
  DP = world / (TP*PP*CP);
- experts: ETP x EP x expert-DP x PP (no CP: the CP ranks fold into expert-DP), so the world must
  also be a multiple of ETP*EP*PP and expert-DP = world / (ETP*EP*PP).
The smallest world is therefore the least common multiple of the two model-parallel sizes.
Dense gradients are reduced, and the distributed optimizer shards, over DP x CP; a step runs
global_batch / (micro_batch * DP) micro-batches.

Nothing here touches process groups: configs are checked with it before any exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

ParallelSection = Any
"""A job's `parallel` section (megatron_ext.config.ParallelConfig: tp, pp, cp, ep, etp, vpp, sp);
typed loosely because the config module computes its sizes with this one."""
JobConfig = Any
"""A job's config (megatron_ext.config.Config): its `parallel` and `train` sections."""

ORDER = "tp-cp-ep-dp-pp"
"""Megatron-Core's default rank order (fastest-varying first), which training uses."""


def _sizes(p: ParallelSection) -> Dict[str, int]:
    sizes = dict(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=p.tp if p.etp is None else p.etp)
    bad = [f"parallel.{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: parallel sizes must be >= 1")
    return sizes


def _min_world(tp: int, pp: int, cp: int, ep: int, etp: int) -> int:
    return math.lcm(tp * pp * cp, etp * ep * pp)


def min_world_size(p: ParallelSection) -> int:
    """The fewest ranks the layout runs on: a multiple of both TP*PP*CP and ETP*EP*PP."""
    return _min_world(**_sizes(p))


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of a config at a world size (`Layout.of`). Derived sizes are floors; a
    world or batch they do not divide is reported by `world_errors` / `batch_errors`."""

    world: int
    tp: int
    pp: int
    vpp: int
    """Model chunks per pipeline rank (1: plain 1F1B)."""
    cp: int
    ep: int
    etp: int
    sp: bool
    micro_batch_size: int
    global_batch_size: int
    model_parallel: int = field(init=False)
    """TP*PP*CP: the ranks one dense replica spans."""
    expert_model_parallel: int = field(init=False)
    """ETP*EP*PP: the ranks one expert replica spans."""
    dp: int = field(init=False)
    """Data-parallel size (without CP): world / (TP*PP*CP); micro-batches per step use it."""
    dp_cp: int = field(init=False)
    """Dense gradients are reduced, and the distributed optimizer shards, over DP x CP."""
    edp: int = field(init=False)
    """Expert-data-parallel size: world / (ETP*EP*PP)."""
    microbatches: int = field(init=False)
    """Micro-batches per step and DP rank: global_batch / (micro_batch * DP)."""

    def __post_init__(self):
        derived = dict(model_parallel=self.tp * self.pp * self.cp, expert_model_parallel=self.etp * self.ep * self.pp)
        derived.update(dp=self.world // derived["model_parallel"], dp_cp=self.world // (self.tp * self.pp),
                       edp=self.world // derived["expert_model_parallel"])
        per_step = self.micro_batch_size * derived["dp"]
        derived["microbatches"] = self.global_batch_size // per_step if per_step > 0 else 0
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, cfg: JobConfig, world: Optional[int] = None) -> "Layout":
        """The layout of `cfg` on `world` ranks (None: the fewest it runs on)."""
        p, t = cfg.parallel, cfg.train
        s = _sizes(p)
        world = min_world_size(p) if world is None else world
        return cls(world=world, vpp=p.vpp or 1, sp=p.sp, micro_batch_size=t.micro_batch_size,
                   global_batch_size=t.global_batch_size, **s)

    @property
    def min_world(self) -> int:
        """The fewest ranks this layout runs on (`min_world_size`)."""
        return _min_world(self.tp, self.pp, self.cp, self.ep, self.etp)

    def world_errors(self) -> List[str]:
        """Why the world does not fit the layout (empty when it does), as Megatron-Core requires."""
        if self.world < 1:
            return [f"world size {self.world} must be >= 1"]
        errors = []
        if self.world % self.model_parallel:
            errors.append(f"world size {self.world} is not divisible by parallel.tp*pp*cp = "
                          f"{self.tp}*{self.pp}*{self.cp} = {self.model_parallel}")
        if (self.ep > 1 or self.etp != self.tp) and self.world % self.expert_model_parallel:
            errors.append(f"world size {self.world} is not divisible by parallel.ep*etp*pp = "
                          f"{self.ep}*{self.etp}*{self.pp}")
        return errors

    def batch_errors(self) -> List[str]:
        """Why the batch sizes do not split into whole micro-batches on every DP rank."""
        if self.dp < 1 or self.micro_batch_size < 1:
            return []
        errors = []
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            errors.append(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                          f"train.micro_batch_size*dp = {self.micro_batch_size}*{self.dp}")
        if self.vpp > 1 and self.microbatches % self.pp:
            errors.append(f"interleaved pipeline (parallel.vpp={self.vpp}) needs the number of microbatches "
                          f"({self.microbatches}) to be a multiple of parallel.pp={self.pp}")
        return errors

    def rank_groups(self) -> Dict[str, List[List[int]]]:
        """Every communication group's ranks, from Megatron-Core's own rank generators:
        tp, cp, dp, pp, dp_cp (dense) and ep, etp, edp (experts)."""
        from megatron.core.parallel_state import RankGenerator  # module only: no process groups

        dense = RankGenerator(tp=self.tp, ep=1, dp=self.dp, pp=self.pp, cp=self.cp, order=ORDER)
        expert = RankGenerator(tp=self.etp, ep=self.ep, dp=self.edp, pp=self.pp, cp=1, order=ORDER)
        groups = {kind: dense.get_ranks(kind) for kind in ("tp", "cp", "dp", "pp")}
        groups["dp_cp"] = dense.get_ranks("dp-cp")
        groups.update(ep=expert.get_ranks("ep"), etp=expert.get_ranks("tp"), edp=expert.get_ranks("dp"))
        return groups
