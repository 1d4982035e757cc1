"""DPO: reference log-probs and the DPO/IPO/SimPO losses equal a hand computation from full
logits (log_softmax + gather) at TP=1 and TP=2; training raises the chosen-vs-rejected margin."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.gloo import run_on_ranks

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
    from megatron_ext import data
    from megatron_ext.build import build
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from posttrain.dpo import DPOStage

    cfg = load_config(["stage=dpo", *overrides])
    validate(cfg, world_size)
    stage = DPOStage(cfg)
    rt = build(cfg, customize=stage.customize_model)
    train_ds, _ = stage.datasets(cfg, 4, 0)
    batch = next(data.loader(train_ds, cfg))
    hand_ref = None
    with torch.no_grad():
        if world_size == 1:
            hand_ref = _hand_logps(rt.model[0], batch)  # policy == reference before the perturbation
        _perturb(rt.model[0])
        hand_pi = _hand_logps(rt.model[0], batch) if world_size == 1 else None
    out, loss_func = stage.forward_step(iter([batch]), rt.model[0])
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
        h = (pi[c] - ref[c]) - (pi[r] - ref[r])
        total += (h - 1 / (2 * beta)) ** 2 if kind == "ipo" else math.log1p(math.exp(-beta * h))
    return total


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_preference_losses_match_hand_computation_at_tp1_and_tp2(kind):
    args = DPO + [f"posttrain.dpo_loss={kind}"]
    (loss, n, rep, ref, hand_ref, hand_pi), = run_on_ranks(_dpo_batch, 1, args)
    if kind != "simpo":  # the precomputed reference log-probs are the hand-computed ones
        torch.testing.assert_close(ref, hand_ref, rtol=1e-5, atol=1e-4)
    pi = hand_pi.tolist()
    lengths = _lengths(args) if kind == "simpo" else None
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
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from posttrain.dpo import DPOStage

    cfg = load_config(["stage=dpo", *overrides])
    validate(cfg, world_size)
    stage = DPOStage(cfg)
    train(cfg, stage)
    return stage.metrics.history, stage.metrics.valid_history


@pytest.mark.slow
def test_dpo_raises_held_out_margin():
    hist, valid = run_on_ranks(_dpo_train, 1, ["train.steps=6", "posttrain.num_samples=48",
                                               "train.eval_interval=3", "train.eval_iters=2"])[0]
    assert hist[0]["margin"] == 0.0  # policy starts equal to the reference
    assert valid[-1]["margin"] > 0.05 and valid[-1]["accuracy"] > 0.8, valid
