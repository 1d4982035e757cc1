"""Reward model: Bradley-Terry loss equals a direct computation at TP=1 and TP=2, the HF export
scores like transformers' SequenceClassification model, training reaches >90% held-out
accuracy on the synthetic task, and a run resumes from its checkpoint."""

import math

import pytest
import torch

from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import stage_batch, stage_metrics, train_stage, valid_metrics

RM = ["model=qwen3_debug", "data.seq_length=48", "train.micro_batch_size=4", "train.global_batch_size=4",
      "posttrain.num_samples=16"]


def _rm_batch(rank, world_size, overrides, export_dir=None):
    from posttrain.rm import export_hf

    cfg, stage, model, batch = stage_batch("rm", world_size, overrides)
    out, loss_func = stage.forward_step(iter([batch]), model)
    loss_sum, n, rep = loss_func(out)
    scores = [out[b, int(batch["last"][b]), 0].item() for b in range(out.shape[0])]
    if export_dir:
        export_hf(model, cfg, export_dir)
    return loss_sum.item(), int(n), {k: v.tolist() for k, v in rep.items()}, scores, batch


def test_bradley_terry_loss_matches_torch_at_tp1_and_tp2(tmp_path):
    (loss, n, rep, scores, _), = run_on_ranks(_rm_batch, 1, RM)
    # By hand: pairs are (0, 1), (2, 3); loss = sum log(1 + exp(-(r_c - r_r))).
    hand = sum(math.log1p(math.exp(-(scores[2 * i] - scores[2 * i + 1]))) for i in range(2))
    assert n == 2 and math.isclose(loss, hand, rel_tol=1e-5), (loss, hand)
    assert rep["accuracy"] == [sum(scores[2 * i] > scores[2 * i + 1] for i in range(2)), 2]
    for got, _, _, tp_scores, _ in run_on_ranks(_rm_batch, 2, RM + ["parallel.tp=2", "parallel.sp=true"]):
        assert math.isclose(got, hand, rel_tol=1e-5), (got, hand)
        torch.testing.assert_close(tp_scores, scores, rtol=1e-5, atol=1e-6)


def test_hf_export_matches_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    (_, _, _, scores, batch), = run_on_ranks(_rm_batch, 1, RM + ["train.init_method_std=0.2"], str(tmp_path))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForSequenceClassification"
    with torch.no_grad():  # right-padded rows: HF pools at the last non-pad token
        got = hf(input_ids=batch["tokens"]).logits.squeeze(-1)
    assert len(set(round(s, 3) for s in scores)) > 1  # the rows really score differently
    torch.testing.assert_close(got, torch.tensor(scores), rtol=1e-4, atol=1e-5)


def _rm_train(rank, world_size, overrides):
    history = train_stage("rm", world_size, overrides)
    return [h["loss"] for h in history], stage_metrics(history), valid_metrics(history)


@pytest.mark.slow
def test_rm_learns_synthetic_preferences_above_90_percent_held_out():
    losses, hist, valid = run_on_ranks(_rm_train, 1, ["train.steps=20", "train.eval_interval=20",
                                                      "train.eval_iters=8"])[0]
    # 8 global batches of 16 sequences = 64 held-out pairs from a separate generator stream.
    assert valid[-1]["accuracy"] > 0.9, valid
    assert losses[-1] < losses[0] and valid[-1]["margin"] > 0.5, (losses, valid)


def test_rm_resumes_from_checkpoint(tmp_path):
    common = ["train.steps=4", "train.global_batch_size=8", "posttrain.num_samples=64",
              f"checkpoint.dir={tmp_path}", "checkpoint.load=auto"]
    first, _, _ = run_on_ranks(_rm_train, 1, common + ["train.exit_interval=2"])[0]
    resumed, hist, _ = run_on_ranks(_rm_train, 1, common)[0]
    (tmp_path / "fresh").mkdir()
    whole, _, _ = run_on_ranks(_rm_train, 1, common[:-2] + [f"checkpoint.dir={tmp_path / 'fresh'}"])[0]
    assert len(first) == 2 and len(resumed) == 2 and len(hist) == 2
    for a, b in zip(first + resumed, whole):
        assert math.isclose(a, b, rel_tol=1e-5), (first + resumed, whole)
