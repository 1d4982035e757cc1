"""posttrain.losses: every registered variant equals a hand computation of the formula of the
project whose name it carries (TRL's GRPOTrainer `_compute_loss` / `_generate_and_score_completions`,
TRL's DPOTrainer / CPOTrainer losses, verl's `core_algos` `agg_loss`, `kl_penalty`,
`compute_policy_loss_gspo`), written out here on small hand-made log-probs, element by element
in plain Python; and GRPO's `grpo_loss_func` with each option equals TRL's loss on the same inputs."""

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain import losses

# Hand-made log-probs: 3 completions of up to 4 tokens (the third has 2), advantages of both signs.
LOGP = [[-0.9, -1.7, -0.2, -2.5], [-1.1, -0.3, -3.0, -0.8], [-0.4, -2.2, 0.0, 0.0]]
OLD = [[-1.2, -1.0, -0.25, -2.0], [-0.7, -0.35, -2.6, -1.3], [-0.45, -1.9, 0.0, 0.0]]
REF = [[-1.0, -1.5, -0.5, -2.2], [-1.0, -0.5, -2.8, -1.0], [-0.6, -2.0, 0.0, 0.0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
ADV = [1.3, -0.8, 0.6]


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _tokens(b):
    return [s for s in range(4) if MASK[b][s]]


# ---------------------------------------------------------------- TRL's GRPO loss, by hand


def _trl_grpo_loss(eps_low, eps_high, beta, level="token", loss_type="bnpo", bias_corrected=False, max_len=4,
                   old=OLD):
    """TRL GRPOTrainer._compute_loss (importance_sampling_level, epsilon_low/high, beta, loss_type
    grpo | bnpo | dr_grpo, use_bias_correction_kl) on LOGP/OLD/REF/MASK/ADV; the KL is k3."""
    per_seq_sums, per_seq_means, total, n_tok = [], [], 0.0, 0
    for b in range(3):
        toks = _tokens(b)
        seq_log_ratio = sum(LOGP[b][s] - old[b][s] for s in toks) / len(toks)
        seq_sum = 0.0
        for s in toks:
            coef_1 = math.exp(LOGP[b][s] - old[b][s] if level == "token" else seq_log_ratio)
            coef_2 = min(max(coef_1, 1 - eps_low), 1 + eps_high)
            loss = -min(coef_1 * ADV[b], coef_2 * ADV[b])
            kl = math.exp(REF[b][s] - LOGP[b][s]) - (REF[b][s] - LOGP[b][s]) - 1
            loss += beta * (kl * coef_1 if bias_corrected else kl)
            seq_sum += loss
        per_seq_sums.append(seq_sum)
        per_seq_means.append(seq_sum / len(toks))
        total, n_tok = total + seq_sum, n_tok + len(toks)
    if loss_type == "grpo":
        return sum(per_seq_means) / 3
    if loss_type == "dr_grpo":
        return total / (3 * max_len)
    return total / n_tok  # bnpo


def _loss_func(old=OLD, **options):
    """posttrain.grpo.grpo_loss_func on the hand-made batch (fp32, as the loss computes):
    (loss / count, report means, d loss / d logp)."""
    from posttrain.grpo import GRPOOptions, grpo_loss_func

    p = GRPOOptions(max_new_tokens=4, **options)
    logp = torch.tensor(LOGP, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.float32)
    batch = {"loss_mask": mask, "old_logp": torch.tensor(old), "ref_logp": torch.tensor(REF),
             "advantage": torch.tensor(ADV), "reward": torch.tensor([1.0, 0.0, 1.0]), "length": mask.sum(-1),
             "truncated": torch.zeros(3)}
    loss, count, rep = grpo_loss_func(batch, p, logp)
    (loss / count).backward()
    return (loss / count).item(), {k: (v[0] / v[1]).item() for k, v in rep.items()}, logp.grad


@pytest.mark.parametrize("options, trl", [
    ({}, dict(eps_low=0.2, eps_high=0.2, beta=0.02)),
    ({"clip_eps_low": 0.1, "clip_eps_high": 0.28}, dict(eps_low=0.1, eps_high=0.28, beta=0.02)),
    ({"importance": "sequence", "loss_agg": "seq_mean_token_mean", "clip_eps": 0.1},
     dict(eps_low=0.1, eps_high=0.1, beta=0.02, level="sequence", loss_type="grpo")),
    ({"loss_agg": "seq_mean_token_mean"}, dict(eps_low=0.2, eps_high=0.2, beta=0.02, loss_type="grpo")),
    ({"loss_agg": "seq_mean_token_sum_norm", "kl_coef": 0.1},
     dict(eps_low=0.2, eps_high=0.2, beta=0.1, loss_type="dr_grpo")),
    ({"kl_estimator": "k3_bias_corrected", "kl_coef": 0.3}, dict(eps_low=0.2, eps_high=0.2, beta=0.3, bias_corrected=True)),
    ({"kl_estimator": "k3_bias_corrected", "importance": "sequence", "kl_coef": 0.3},
     dict(eps_low=0.2, eps_high=0.2, beta=0.3, level="sequence", bias_corrected=True)),
    ({"kl_coef": 0.0, "clip_eps_high": 0.05}, dict(eps_low=0.2, eps_high=0.05, beta=0.0)),
])
def test_grpo_loss_equals_trls(options, trl):
    got, rep, _ = _loss_func(**options)
    want = _trl_grpo_loss(**trl)
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-7), (got, want)


def test_clip_fractions_are_trls_low_and_high_counts():
    """TRL: is_low_clipped = (coef_1 < 1 - eps_low) & (A < 0), is_high_clipped = (coef_1 > 1 + eps_high)
    & (A > 0), averaged over completion tokens; their sum is verl's pg_clipfrac."""
    low_eps, high_eps = 0.1, 0.28
    _, rep, _ = _loss_func(clip_eps_low=low_eps, clip_eps_high=high_eps)
    low = high = n = 0
    for b in range(3):
        for s in _tokens(b):
            ratio = math.exp(LOGP[b][s] - OLD[b][s])
            low += ratio < 1 - low_eps and ADV[b] < 0
            high += ratio > 1 + high_eps and ADV[b] > 0
            n += 1
    assert low > 0 and high > 0  # the hand-made log-probs clip on both sides
    for key, count in (("clip_frac_low", low), ("clip_frac_high", high), ("clip_frac", low + high)):
        assert math.isclose(rep[key], count / n, rel_tol=1e-6), (key, rep[key], count / n)


def test_gspo_gradient_equals_verls_token_form():
    """TRL's sequence ratio exp(mean log-ratio) and verl's compute_policy_loss_gspo token form
    (log s_it = logp - sg(logp) + sg(mean log-ratio)) give the same gradient under seq-mean-token-mean."""
    _, _, grad = _loss_func(importance="sequence", loss_agg="seq_mean_token_mean", kl_coef=0.0, clip_eps=0.1)
    logp, old, mask = torch.tensor(LOGP, requires_grad=True), torch.tensor(OLD), torch.tensor(MASK, dtype=torch.float32)
    adv = torch.tensor(ADV).unsqueeze(-1)
    seq = ((logp - old) * mask).sum(-1) / mask.sum(-1)
    ratio = torch.exp(logp - logp.detach() + seq.detach().unsqueeze(-1))
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.9, 1.1))
    verl = (((per_token * mask).sum(-1) / mask.sum(-1)).sum() / 3)
    verl.backward()
    torch.testing.assert_close(grad, logp.grad, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_values_are_verls_and_trls():
    """verl kl_penalty_forward: k1 = logp - ref, k2 = 0.5 (logp - ref)^2, k3 (low_var_kl, within
    its clamps) = exp(ref - logp) - (ref - logp) - 1, which is TRL's per_token_kl."""
    logp, ref, ratio = _t(LOGP), _t(REF), torch.ones(3, 4, dtype=torch.float64)
    for b in range(3):
        for s in range(4):
            d = REF[b][s] - LOGP[b][s]
            want = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}
            want.update({"k1+": want["k1"], "k3+": want["k3"], "k3_bias_corrected": want["k3"]})
            for name, value in want.items():
                got = losses.KL_ESTIMATORS[name](logp, ref, ratio)[b, s].item()
                assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-15), (name, b, s)


def _kl_grad(name):
    logp = _t(LOGP).requires_grad_(True)
    ratio = torch.exp(logp - logp.detach())  # on-policy: 1 in value, d ratio / d logp = 1
    kl = losses.KL_ESTIMATORS[name](logp, _t(REF), ratio)
    kl.sum().backward()
    return kl.detach(), logp.grad


def test_straight_through_kl_has_k2s_gradient():
    """verl kl_penalty with a '+' name: k2's gradient (logp - ref), the forward estimator's value."""
    for name, base in (("k1+", "k1"), ("k3+", "k3")):
        value, grad = _kl_grad(name)
        torch.testing.assert_close(value, _kl_grad(base)[0])
        torch.testing.assert_close(grad, _t(LOGP) - _t(REF))


def test_bias_corrected_kl_same_value_other_gradient():
    """TRL use_bias_correction_kl: k3 * coef_1. On-policy the loss value is k3's; the gradient
    gains k3 (d coef_1 / d logp = 1): d/dlogp = 1 - exp(ref - logp) + k3."""
    value, grad = _kl_grad("k3_bias_corrected")
    k3_value, k3_grad = _kl_grad("k3")
    torch.testing.assert_close(value, k3_value, rtol=0, atol=0)
    for b in range(3):
        for s in range(4):
            d = REF[b][s] - LOGP[b][s]
            assert math.isclose(k3_grad[b, s].item(), 1 - math.exp(d), rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(grad[b, s].item(), 1 - math.exp(d) + math.exp(d) - d - 1, rel_tol=1e-12, abs_tol=1e-15)
    assert (grad - k3_grad).abs().max() > 0.01
    # In the whole loss, on-policy (old = logp): the same value, a different gradient.
    plain, _, g_plain = _loss_func(old=LOGP, kl_coef=0.5)
    corrected, _, g_corrected = _loss_func(old=LOGP, kl_coef=0.5, kl_estimator="k3_bias_corrected")
    assert plain == corrected and (g_plain - g_corrected).abs().max() > 1e-3
    assert math.isclose(corrected, _trl_grpo_loss(0.2, 0.2, 0.5, bias_corrected=True, old=LOGP), rel_tol=1e-6)


# ---------------------------------------------------------------- aggregation (verl agg_loss)


def test_loss_aggregations_are_verls_agg_loss():
    per_token, mask = _t(LOGP), _t(MASK)  # any [b, s] values
    sums = [sum(LOGP[b][s] for s in _tokens(b)) for b in range(3)]
    lengths = [len(_tokens(b)) for b in range(3)]
    want = {"token_mean": sum(sums) / sum(lengths),                                  # token-mean
            "seq_mean_token_mean": sum(x / n for x, n in zip(sums, lengths)) / 3,   # seq-mean-token-mean
            "seq_mean_token_sum": sum(sums) / 3,                                     # seq-mean-token-sum
            "seq_mean_token_sum_norm": sum(sums) / (3 * 7)}                          # .../loss_scale_factor=7
    for name, value in want.items():
        total, count = losses.LOSS_AGGREGATIONS[name](per_token, mask, 7)
        assert math.isclose((total / count).item(), value, rel_tol=1e-12), name
    # verl leaves completions with no loss token (e.g. masked as truncated) out of the seq means.
    mask[1] = 0
    total, count = losses.LOSS_AGGREGATIONS["seq_mean_token_mean"](per_token, mask, 7)
    assert math.isclose((total / count).item(), (sums[0] / 4 + sums[2] / 2) / 2, rel_tol=1e-12)


# ---------------------------------------------------------------- advantages


REWARDS = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5]  # the middle group has no signal


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))  # unbiased, as TRL's nanstd


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_are_trls(scale):
    """TRL _generate_and_score_completions: A = r - mean_group, / (std + 1e-4) of the group
    (scale_rewards="group"), of the whole batch ("batch"), or not scaled ("none")."""
    got = losses.grpo_advantages(torch.tensor(REWARDS), 3, scale).tolist()
    for i, r in enumerate(REWARDS):
        group = REWARDS[i // 3 * 3: i // 3 * 3 + 3]
        want = r - sum(group) / 3
        if scale != "none":
            want /= (_std(group) if scale == "group" else _std(REWARDS)) + 1e-4
        assert math.isclose(got[i], want, rel_tol=1e-6, abs_tol=1e-7), (i, got[i], want)


def test_groups_with_signal():
    assert losses.groups_with_signal(torch.tensor(REWARDS), 3).tolist() == [True, False, True]


def test_scale_rewards_booleans_are_aliases():
    from posttrain.grpo import group_advantages, reward_scale

    assert reward_scale(SimpleNamespace(scale_rewards="True")) == "group"
    assert reward_scale(SimpleNamespace(scale_rewards="false")) == "none"
    assert reward_scale(SimpleNamespace(scale_rewards="batch")) == "batch"
    r = torch.tensor(REWARDS[:6])
    assert torch.equal(group_advantages(r, 3, False), losses.grpo_advantages(r, 3, "none"))


# ---------------------------------------------------------------- preference losses


def test_preference_losses_are_trls():
    """TRL DPOTrainer: sigmoid -logsigmoid(beta h), ipo (h_avg - 1/(2 beta))^2; CPOTrainer simpo
    -logsigmoid(beta (avg_c - avg_r) - gamma) with gamma = beta * gamma_beta_ratio."""
    pi, ref, lengths = [-10.0, -14.0, -3.0, -2.5], [-11.0, -13.0, -3.5, -2.0], [5.0, 7.0, 2.0, 1.0]
    beta, gamma = 0.3, 0.5
    T = torch.tensor
    for name in ("sigmoid", "ipo", "ipo_sum", "simpo"):
        got, rc, rr = losses.PREFERENCE_LOSSES[name](beta, gamma, T(pi), T(ref), T(lengths))
        for i in range(2):
            c, r = 2 * i, 2 * i + 1
            h = (pi[c] - ref[c]) - (pi[r] - ref[r])
            h_avg = (pi[c] - ref[c]) / lengths[c] - (pi[r] - ref[r]) / lengths[r]
            z = beta * (pi[c] / lengths[c] - pi[r] / lengths[r]) - gamma
            want = {"sigmoid": math.log1p(math.exp(-beta * h)), "ipo": (h_avg - 1 / (2 * beta)) ** 2,
                    "ipo_sum": (h - 1 / (2 * beta)) ** 2, "simpo": math.log1p(math.exp(-z))}[name]
            assert math.isclose(got[i].item(), want, rel_tol=1e-6), (name, i)


# ---------------------------------------------------------------- names


def test_unknown_names_are_config_errors_listing_the_known_ones():
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError
    from posttrain.dpo import DPOStage
    from posttrain.grpo import GRPOStage

    with pytest.raises(ConfigError, match=r"grpo.kl_estimator='k4' is not one of: k1, k2, k3, k1\+, k3\+"):
        GRPOStage(load_config(["stage=grpo", "model=qwen3_debug", "grpo.kl_estimator=k4"]))
    with pytest.raises(ConfigError, match="grpo.importance='seq'.*token, sequence(.|\n)*grpo.loss_agg='mean' "
                                          "is not one of: token_mean, seq_mean_token_mean"):
        GRPOStage(load_config(["stage=grpo", "model=qwen3_debug", "grpo.importance=seq", "grpo.loss_agg=mean"]))
    with pytest.raises(ConfigError, match="grpo.scale_rewards='std' is not one of: group, batch, none"):
        GRPOStage(load_config(["stage=grpo", "model=qwen3_debug", "grpo.scale_rewards=std"]))
    with pytest.raises(ConfigError, match="grpo.adv_estimator='gae' is not one of: grpo"):
        GRPOStage(load_config(["stage=grpo", "model=qwen3_debug", "grpo.adv_estimator=gae"]))
    with pytest.raises(ConfigError, match="grpo.updates_per_batch=0"):
        GRPOStage(load_config(["stage=grpo", "model=qwen3_debug", "grpo.updates_per_batch=0"]))
    with pytest.raises(ConfigError, match="grpo.clip_eps_low=1.5 must be in"):
        GRPOStage(load_config(["stage=grpo", "model=qwen3_debug", "grpo.clip_eps_low=1.5"]))
    with pytest.raises(ConfigError, match="dpo.loss='kto' is not one of: sigmoid, ipo, ipo_sum, simpo"):
        DPOStage(load_config(["stage=dpo", "model=qwen3_debug", "dpo.loss=kto"]))
    with pytest.raises(ValueError, match="registered twice"):
        losses.register(losses.KL_ESTIMATORS, "k1")(lambda *a: None)
