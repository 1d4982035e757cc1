"""DPO: reference log-probs and the DPO/IPO/SimPO losses equal a hand computation from full
logits (log_softmax + gather) at TP=1 and TP=2; pipeline parallelism (with and without virtual
stages) trains exactly like one process and prints the stage metrics; training raises the
chosen-vs-rejected margin."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import stage_batch, stage_metrics, train_stage, valid_metrics

DPO = ["model=qwen3_debug", "data.seq_length=48", "train.micro_batch_size=4", "train.global_batch_size=4",
       "posttrain.num_samples=8"]


def _perturb(chunk):
    """Move the policy away from the reference, identically at any TP (the final norm is replicated)."""
    w = chunk.module.decoder.final_layernorm.weight
    with torch.no_grad():
        w.mul_(1 + 0.5 * torch.sin(torch.arange(w.numel(), dtype=w.dtype)))


def _hand_logps(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], attention_mask=None).float()
    lp = F.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    return (lp * batch["loss_mask"]).sum(-1)


def _dpo_batch(rank, world_size, overrides):
    cfg, stage, model, batch = stage_batch("dpo", world_size, overrides)
    hand_ref = None
    with torch.no_grad():
        if world_size == 1:
            hand_ref = _hand_logps(model, batch)  # policy == reference before the perturbation
        _perturb(model)
        hand_pi = _hand_logps(model, batch) if world_size == 1 else None
    out, loss_func = stage.forward_step(iter([batch]), model)
    loss_sum, n, rep = loss_func(out)
    return loss_sum.item(), int(n), {k: v.tolist() for k, v in rep.items()}, batch["ref_logp"], hand_ref, hand_pi


def _by_hand(kind, pi, ref, lengths, beta=0.1, gamma=0.5):
    total = 0.0
    for i in range(len(pi) // 2):
        c, r = 2 * i, 2 * i + 1
        if kind == "simpo":
            z = beta * (pi[c] / lengths[c] - pi[r] / lengths[r]) - gamma
            total += math.log1p(math.exp(-z))
            continue
        if kind == "ipo":  # TRL: log-ratios averaged over each reply's tokens
            h = (pi[c] - ref[c]) / lengths[c] - (pi[r] - ref[r]) / lengths[r]
        else:
            h = (pi[c] - ref[c]) - (pi[r] - ref[r])
        total += (h - 1 / (2 * beta)) ** 2 if kind.startswith("ipo") else math.log1p(math.exp(-beta * h))
    return total


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "ipo_sum", "simpo"])
def test_preference_losses_match_hand_computation_at_tp1_and_tp2(kind):
    args = DPO + [f"dpo.loss={kind}"]
    (loss, n, rep, ref, hand_ref, hand_pi), = run_on_ranks(_dpo_batch, 1, args)
    if kind != "simpo":  # the precomputed reference log-probs are the hand-computed ones
        torch.testing.assert_close(ref, hand_ref, rtol=1e-5, atol=1e-4)
    pi = hand_pi.tolist()
    lengths = _lengths(args) if kind in ("simpo", "ipo") else None
    hand = _by_hand(kind, pi, hand_ref.tolist(), lengths)
    assert n == 2 and abs(pi[0] - hand_ref[0].item()) > 1e-3  # the policy really differs from the reference
    assert math.isclose(loss, hand, rel_tol=1e-5), (kind, loss, hand)
    for got, _, _, tp_ref, _, _ in run_on_ranks(_dpo_batch, 2, args + ["parallel.tp=2"]):
        assert math.isclose(got, hand, rel_tol=1e-5), (kind, got, hand)
        if kind != "simpo":
            torch.testing.assert_close(tp_ref, hand_ref, rtol=1e-5, atol=1e-4)


def _lengths(args):
    """Reply lengths (masked targets) of the first micro-batch, computed without the model."""
    from megatron_ext.cli import load_config
    from posttrain.rm import preference_datasets

    cfg = load_config(["stage=dpo", *args])
    train, _ = preference_datasets(cfg, 4, 0)
    return [train[i]["loss_mask"].sum().item() for i in range(4)]


def _dpo_train(rank, world_size, overrides):
    history = train_stage("dpo", world_size, overrides)
    return stage_metrics(history), valid_metrics(history)


@pytest.mark.slow
def test_dpo_raises_held_out_margin():
    hist, valid = run_on_ranks(_dpo_train, 1, ["train.steps=6", "posttrain.num_samples=48",
                                               "train.eval_interval=3", "train.eval_iters=2"])[0]
    assert hist[0]["margin"] == 0.0  # policy starts equal to the reference
    assert valid[-1]["margin"] > 0.05 and valid[-1]["accuracy"] > 0.8, valid


def test_ipo_is_length_normalised_as_in_trl():
    """TRL's IPO: ((pi_c - ref_c)/|c| - (pi_r - ref_r)/|r| - 1/(2 beta))^2; ipo_sum keeps the sums."""
    from posttrain.dpo import preference_loss

    pi, ref = torch.tensor([-10.0, -30.0, -4.0, -3.0]), torch.tensor([-12.0, -27.0, -5.0, -2.0])
    lengths = torch.tensor([4.0, 10.0, 2.0, 1.0])
    beta = 0.5
    losses, rc, rr = preference_loss("ipo", beta, 0.0, pi, ref, lengths)
    want = [((2.0 / 4 - (-3.0) / 10) - 1.0) ** 2, ((1.0 / 2 - (-1.0) / 1) - 1.0) ** 2]
    torch.testing.assert_close(losses, torch.tensor(want))
    torch.testing.assert_close(rc, beta * torch.tensor([2.0, 1.0]))  # rewards: summed log-ratios, as TRL's
    summed, _, _ = preference_loss("ipo_sum", beta, 0.0, pi, ref, lengths)
    torch.testing.assert_close(summed, torch.tensor([(5.0 - 1.0) ** 2, (2.0 - 1.0) ** 2]))


def test_ipo_metrics_are_trls_summed_ones_and_normalised_ones_have_their_own_names():
    """TRL's DPOTrainer logs, for ipo as for sigmoid, rewards = beta * (policy_logps_sum -
    ref_logps_sum), margins = chosen - rejected and accuracies = mean(chosen > rejected); its loss
    alone is per token. Pairs where the two disagree: summed and per-token accuracies differ and
    the margins have opposite signs."""
    from posttrain.dpo import preference_loss, preference_metrics

    beta = 0.1
    # (policy chosen, ref chosen, |chosen|, policy rejected, ref rejected, |rejected|)
    pairs = [(-20.0, -24.0, 40, -10.0, -11.0, 2),   # summed: chosen wins 0.4 > 0.1; per token: 0.01 < 0.05
             (-30.0, -36.0, 60, -8.0, -9.5, 3),     # summed: chosen wins; per token: loses
             (-5.0, -5.5, 1, -50.0, -50.2, 100),    # both: chosen wins
             (-9.0, -8.0, 10, -7.0, -7.5, 5)]       # both: rejected wins
    pi = torch.tensor([v for p in pairs for v in (p[0], p[3])])
    ref = torch.tensor([v for p in pairs for v in (p[1], p[4])])
    lengths = torch.tensor([float(v) for p in pairs for v in (p[2], p[5])])
    losses, rc, rr = preference_loss("ipo", beta, 0.0, pi, ref, lengths)
    rep = {k: (float(s) / c) for k, (s, c) in preference_metrics("ipo", rc, rr, lengths).items()}

    # TRL by hand: chosen_rewards = beta * (chosen_logps - ref_chosen_logps), summed log-probs.
    chosen = [beta * (p[0] - p[1]) for p in pairs]
    rejected = [beta * (p[3] - p[4]) for p in pairs]
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(pairs)
    assert math.isclose(rep["chosen_reward"], sum(chosen) / n, rel_tol=1e-5)
    assert math.isclose(rep["rejected_reward"], sum(rejected) / n, rel_tol=1e-5)
    assert math.isclose(rep["margin"], sum(margins) / n, rel_tol=1e-5)
    assert rep["accuracy"] == sum(m > 0 for m in margins) / n == 0.75
    # The per-token ones, under their own names.
    nc = [beta * (p[0] - p[1]) / p[2] for p in pairs]
    nr = [beta * (p[3] - p[4]) / p[5] for p in pairs]
    assert math.isclose(rep["chosen_reward_normalized"], sum(nc) / n, rel_tol=1e-5)
    assert math.isclose(rep["rejected_reward_normalized"], sum(nr) / n, rel_tol=1e-5)
    assert math.isclose(rep["margin_normalized"], sum(c - r for c, r in zip(nc, nr)) / n, rel_tol=1e-5)
    assert rep["accuracy_normalized"] == 0.25
    assert rep["margin"] > 0 > rep["margin_normalized"]  # same model, opposite signs
    # The loss is unchanged: TRL's per-token IPO.
    want = [((c - r) / beta - 1 / (2 * beta)) ** 2 for c, r in zip(nc, nr)]
    torch.testing.assert_close(losses, torch.tensor(want))
    # Other losses report no per-token variants.
    assert "margin_normalized" not in preference_metrics("sigmoid", rc, rr, lengths)


PP = ["model=qwen3_debug", "data.seq_length=48", "train.micro_batch_size=2",
      "train.global_batch_size=4", "posttrain.num_samples=8", "train.steps=3", "checkpoint.keep_last=0"]


def _dpo_records(rank, world_size, overrides):
    return train_stage("dpo", world_size, overrides)


def _check_layout_equals_one_process(ref, results, steps, keys):
    """Every rank's per-step loss and stage metrics (`keys`; the loop sends them along the
    pipeline to every rank) equal one process's."""
    for records in results:
        assert len(records) == steps
        for got, want in zip(records, ref):
            assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5, abs_tol=1e-7), (records, ref)
            assert stage_metrics([got])[0].keys() == stage_metrics([want])[0].keys() >= set(keys), (got, want)
            for k in keys:
                assert math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=1e-5), (k, got, want)


def test_dpo_pipeline_parallel_equals_one_process():
    """Initial weights depend on the seed only (megatron_ext.init), so PP=2 and PP=2 with 2
    virtual stages per rank, from scratch, give one process's per-step losses and metrics;
    step 1 (policy == reference) is ln 2."""
    ref = run_on_ranks(_dpo_records, 1, PP)[0]
    losses = [r["loss"] for r in ref]
    assert abs(losses[0] - math.log(2)) < 1e-6 and losses[1] < losses[0], losses  # then it learns
    assert abs(ref[0]["margin"]) < 1e-6 and ref[1]["margin"] > 0, ref
    for layout in (["parallel.pp=2"], ["parallel.pp=2", "parallel.vpp=2"]):
        results = run_on_ranks(_dpo_records, 2, PP + layout)
        for records in results:
            assert abs(records[0]["loss"] - math.log(2)) < 1e-6, (layout, records)
        _check_layout_equals_one_process(ref, results, 3, ("accuracy", "margin", "chosen_reward", "rejected_reward"))
