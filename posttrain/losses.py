"""Loss variants of the post-training stages, in registries keyed by the names users set.

Each entry is one small pure function on tensors, tested against a hand computation of the
published formula (tests/test_losses.py). A stage picks entries by config key; `lookup` turns
an unknown name into a ConfigError that lists the known ones, when the stage is constructed.

- `PREFERENCE_LOSSES` (`dpo.loss`): sigmoid (DPO), ipo (TRL's length-normalised IPO), ipo_sum,
  simpo. fn(beta, gamma, pi, ref, lengths) -> (per-pair losses, chosen reward, rejected reward)
  from [2n] interleaved (chosen, rejected) summed reply log-probs.
- `ADVANTAGE_ESTIMATORS` (`grpo.adv_estimator`): grpo (group-normalised outcome rewards, as
  verl's `compute_grpo_outcome_advantage` and TRL's GRPOTrainer). fn(rewards, group_size, scale).
- `REWARD_SCALES` (`grpo.scale_rewards`): group | batch | none, TRL's `scale_rewards`.
- `KL_ESTIMATORS` (`grpo.kl_estimator`): k1, k2, k3, verl's straight-through k1+ / k3+, and
  TRL's importance-corrected k3 (k3_bias_corrected). fn(logp, ref_logp, ratio) -> per-token KL.
- `POLICY_LOSSES` (`grpo.importance`): token (PPO clip, TRL/verl's vanilla loss) and sequence
  (GSPO). fn(logp, old_logp, advantages, mask, eps_low, eps_high) -> PolicyTerms.
- `LOSS_AGGREGATIONS` (`grpo.loss_agg`): token_mean, seq_mean_token_mean, seq_mean_token_sum,
  seq_mean_token_sum_norm (verl's `agg_loss` modes). fn(per_token, mask, max_len) -> (sum, count):
  the loop divides the summed sum by the summed count over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from megatron_ext.config import ConfigError

PREFERENCE_LOSSES: Dict[str, Callable] = {}
ADVANTAGE_ESTIMATORS: Dict[str, Callable] = {}
REWARD_SCALES = ("group", "batch", "none")
KL_ESTIMATORS: Dict[str, Callable] = {}
POLICY_LOSSES: Dict[str, Callable] = {}
LOSS_AGGREGATIONS: Dict[str, Callable] = {}


def register(table: Dict[str, Callable], *names: str):
    """Decorator: file a function in `table` under each of `names`."""
    def add(fn: Callable) -> Callable:
        for name in names:
            if name in table:
                raise ValueError(f"loss variant {name!r} is registered twice")
            table[name] = fn
        return fn
    return add


def lookup(table, name: str, key: str):
    """table[name], or a ConfigError naming the key and the known values."""
    if name not in table:
        raise ConfigError(f"{key}={name!r} is not one of: {', '.join(table)}")
    return table[name] if isinstance(table, dict) else name


# ---------------------------------------------------------------- preference losses (DPO family)


@register(PREFERENCE_LOSSES, "sigmoid")
def dpo_sigmoid(beta, gamma, pi, ref, lengths):
    """DPO: -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r); rewards beta * (pi - ref)."""
    ratio = pi - ref
    rc, rr = beta * ratio[0::2], beta * ratio[1::2]
    return -F.logsigmoid(beta * (ratio[0::2] - ratio[1::2])), rc, rr


@register(PREFERENCE_LOSSES, "ipo")
def ipo(beta, gamma, pi, ref, lengths):
    """TRL's IPO: (h_avg - 1 / (2 beta))^2 with the log-ratios averaged per token."""
    ratio = pi - ref
    rc, rr = beta * ratio[0::2], beta * ratio[1::2]
    ratio = ratio / lengths
    return (ratio[0::2] - ratio[1::2] - 1.0 / (2.0 * beta)) ** 2, rc, rr


@register(PREFERENCE_LOSSES, "ipo_sum")
def ipo_sum(beta, gamma, pi, ref, lengths):
    """IPO on token-summed log-ratios: (h - 1 / (2 beta))^2."""
    ratio = pi - ref
    rc, rr = beta * ratio[0::2], beta * ratio[1::2]
    return (ratio[0::2] - ratio[1::2] - 1.0 / (2.0 * beta)) ** 2, rc, rr


@register(PREFERENCE_LOSSES, "simpo")
def simpo(beta, gamma, pi, ref, lengths):
    """SimPO (no reference): -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)."""
    avg = pi / lengths
    rc, rr = beta * avg[0::2], beta * avg[1::2]
    return -F.logsigmoid(rc - rr - gamma), rc, rr


# ---------------------------------------------------------------- advantages


@register(ADVANTAGE_ESTIMATORS, "grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Rewards [n * group_size] (consecutive groups) -> r - mean_group, divided by
    std + 1e-4 of the group (`group`), of the whole batch (`batch`) or not at all (`none`,
    Dr. GRPO). Stds are unbiased, as TRL's `nanstd` and verl's `torch.std`."""
    flat = rewards.float()
    groups = flat.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (flat.std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards={scale!r} is not one of {REWARD_SCALES}")
    return centred.reshape(-1)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n] bools: the groups whose rewards are not all equal (DAPO's dynamic-sampling filter)."""
    groups = rewards.float().view(-1, group_size)
    return (groups != groups[:, :1]).any(dim=1)


# ---------------------------------------------------------------- KL estimators (to the reference)


@register(KL_ESTIMATORS, "k1")
def kl_k1(logp, ref, ratio):
    """log pi - log ref (verl's `kl`/`k1`)."""
    return logp - ref


@register(KL_ESTIMATORS, "k2")
def kl_k2(logp, ref, ratio):
    """0.5 (log pi - log ref)^2 (verl's `mse`/`k2`)."""
    return 0.5 * (logp - ref).square()


@register(KL_ESTIMATORS, "k3")
def kl_k3(logp, ref, ratio):
    """exp(ref - logp) - (ref - logp) - 1 (TRL's GRPO KL; verl's `low_var_kl` without its clamps)."""
    diff = ref - logp
    return torch.exp(diff) - diff - 1


def _k2_gradient(value, logp, ref):
    """`value`'s value with k2's gradient (verl's straight-through `+` estimators)."""
    k2 = kl_k2(logp, ref, None)
    return k2 - k2.detach() + value.detach()


@register(KL_ESTIMATORS, "k1+")
def kl_k1_plus(logp, ref, ratio):
    """verl's `k1+`: the k1 value, the gradient of k2 (an unbiased KL gradient)."""
    return _k2_gradient(kl_k1(logp, ref, ratio), logp, ref)


@register(KL_ESTIMATORS, "k3+")
def kl_k3_plus(logp, ref, ratio):
    """verl's `k3+`: the k3 value, the gradient of k2 (an unbiased KL gradient)."""
    return _k2_gradient(kl_k3(logp, ref, ratio), logp, ref)


@register(KL_ESTIMATORS, "k3_bias_corrected")
def kl_k3_bias_corrected(logp, ref, ratio):
    """TRL's `use_bias_correction_kl`: k3 times the importance ratio pi / pi_old (as the policy
    loss takes it, token or sequence level). On-policy the ratio is 1 in value, so the loss is k3's
    and only the gradient differs (it gains k3 * grad log pi)."""
    return kl_k3(logp, ref, ratio) * ratio


# ---------------------------------------------------------------- policy losses


@dataclass
class PolicyTerms:
    loss: torch.Tensor
    """Per-token clipped policy loss [b, s]."""
    ratio: torch.Tensor
    """Importance ratio pi / pi_old per token [b, s] (the sequence's for GSPO), with its gradient."""
    clipped_low: torch.Tensor
    """1.0 where the clipped term is the one taken with A < 0 (ratio < 1 - eps_low)."""
    clipped_high: torch.Tensor
    """1.0 where the clipped term is the one taken with A > 0 (ratio > 1 + eps_high)."""


def clipped_objective(ratio, advantages, eps_low, eps_high) -> PolicyTerms:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) per token; A is [b]."""
    adv = advantages.unsqueeze(-1)
    unclipped = -ratio * adv
    clipped_loss = -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    taken = clipped_loss > unclipped  # verl's pg_clipfrac: the clip changed the loss
    return PolicyTerms(torch.maximum(unclipped, clipped_loss), ratio,
                       (taken & (adv < 0)).float(), (taken & (adv > 0)).float())


@register(POLICY_LOSSES, "token")
def ppo_token(logp, old_logp, advantages, mask, eps_low, eps_high) -> PolicyTerms:
    """PPO/GRPO: ratio exp(logp - old_logp) per token (TRL importance_sampling_level="token")."""
    return clipped_objective(torch.exp(logp - old_logp), advantages, eps_low, eps_high)


@register(POLICY_LOSSES, "sequence")
def gspo_sequence(logp, old_logp, advantages, mask, eps_low, eps_high) -> PolicyTerms:
    """GSPO: one ratio per completion, exp(mean over its tokens of logp - old_logp), as TRL's
    importance_sampling_level="sequence" (verl's `gspo` gives the same values and gradients)."""
    log_ratio = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    ratio = torch.exp(log_ratio).unsqueeze(-1).expand_as(logp)
    return clipped_objective(ratio, advantages, eps_low, eps_high)


# ---------------------------------------------------------------- aggregation (verl's agg_loss)


@register(LOSS_AGGREGATIONS, "token_mean")
def token_mean(per_token, mask, max_len):
    """Sum over every completion token / number of completion tokens (verl token-mean, TRL bnpo/dapo)."""
    return (per_token * mask).sum(), mask.sum()


@register(LOSS_AGGREGATIONS, "seq_mean_token_mean")
def seq_mean_token_mean(per_token, mask, max_len):
    """Mean over completions of each one's token mean (verl seq-mean-token-mean, TRL's `grpo`);
    completions with no loss token are left out of the count, as verl does."""
    lengths = mask.sum(-1)
    return ((per_token * mask).sum(-1) / lengths.clamp(min=1.0)).sum(), (lengths > 0).sum()


@register(LOSS_AGGREGATIONS, "seq_mean_token_sum")
def seq_mean_token_sum(per_token, mask, max_len):
    """Mean over completions of each one's token sum (verl seq-mean-token-sum)."""
    return (per_token * mask).sum(), (mask.sum(-1) > 0).sum()


@register(LOSS_AGGREGATIONS, "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(per_token, mask, max_len):
    """Dr. GRPO: sum over every token / (completions * max completion length), a constant
    normaliser (TRL's `dr_grpo`; verl seq-mean-token-sum-norm with loss_scale_factor = max_len)."""
    return (per_token * mask).sum(), torch.tensor(mask.shape[0] * max_len, dtype=mask.dtype)
