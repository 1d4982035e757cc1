"""Per-step router statistics for MoE models: tokens per expert, max-violation, dropped tokens.

Forward hooks on Megatron's TopKRouter read each routing decision (after capacity dropping);
`collect()` sums them over all ranks once per step. Every token is routed on exactly one rank
per layer (MoE with TP requires SP, so TP ranks route disjoint sequence shards), so the sum
over the world counts each token once.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core.transformer.moe.router import TopKRouter


class RouterStats:
    """Accumulates routing counts of the current step; `collect()` reduces and resets."""

    def __init__(self, chunks, num_layers: int, num_experts: int, topk: int):
        self.topk = topk
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.dropped = torch.zeros(1, dtype=torch.float64)
        routers = [m for c in chunks for m in getattr(c, "module", c).modules() if isinstance(m, TopKRouter)]
        self._handles = [r.register_forward_hook(self._hook) for r in routers]

    def _hook(self, router, inputs, outputs) -> None:
        if not router.training:  # evaluation passes are not training statistics
            return
        routing_map = outputs[1].detach()
        self.counts[router.layer_number - 1] += routing_map.sum(dim=0).double().cpu()
        self.dropped += routing_map.shape[0] * self.topk - routing_map.sum().double().cpu()

    def reset(self) -> None:
        self.counts.zero_()
        self.dropped.zero_()

    def collect(self) -> Dict[str, object]:
        """Collective: this step's statistics over all ranks (then reset)."""
        packed = torch.cat([self.counts.flatten(), self.dropped])
        if torch.cuda.is_available():
            packed = packed.cuda()
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        counts = packed[:-1].view_as(self.counts)
        moe_layers = counts[counts.sum(dim=1) > 0]  # dense layers route nothing
        self.reset()
        if moe_layers.numel() == 0:
            return {}
        mean = moe_layers.mean(dim=1, keepdim=True)
        return {
            "tokens_per_expert_min": moe_layers.min().item(),
            "tokens_per_expert_max": moe_layers.max().item(),
            "tokens_per_expert_mean": moe_layers.mean().item(),
            # MaxVio: how far the busiest expert is above the even share, worst layer.
            "max_violation": ((moe_layers.max(dim=1, keepdim=True).values - mean) / mean).max().item(),
            "dropped_tokens": packed[-1].item(),
            "expert_share": (moe_layers / moe_layers.sum(dim=1, keepdim=True)).tolist(),
        }

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def for_model(cfg, chunks) -> "RouterStats | None":
    m = cfg.model
    return RouterStats(chunks, m.num_layers, m.num_experts, m.moe_router_topk) if m.is_moe else None


KEYS = ("tokens_per_expert_min", "tokens_per_expert_max", "tokens_per_expert_mean", "max_violation",
        "dropped_tokens", "expert_share")
"""The step record's keys that `RouterStats.collect` adds."""
LOGGED = ("tokens_per_expert_min", "tokens_per_expert_max", "max_violation", "dropped_tokens")


def log_fields(record: dict) -> List[tuple]:
    return [(k, record[k]) for k in LOGGED if k in record]
