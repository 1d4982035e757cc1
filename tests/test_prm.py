"""PRM: labels sit on the step separators, rows without step labels use ProcessBench's label
or fail naming file:line, the BCE loss equals a direct computation at TP=1 and TP=2, and the
ProcessBench prediction/F1 follow its definition."""

import json
import math

import pytest
import torch

from tests.forked_ranks import run_on_ranks
from tests.stage_fixture import stage_batch

PRM = ["model=qwen3_debug", "data.seq_length=80", "train.micro_batch_size=4", "train.global_batch_size=4",
       "posttrain.num_samples=8"]


def test_step_labels_sit_on_separator_tokens():
    from data_prep.tokenizer import get_tokenizer
    from posttrain.prm import step_item

    tok = get_tokenizer("qwen3")
    row = {"problem": "Add: 1 + 2 + 3", "steps": ["1 + 2 = 3", "3 + 3 = 7"], "label": 1}
    item = step_item(tok, row, 80, "row")
    pos = torch.nonzero(item["step_mask"]).flatten().tolist()
    assert len(pos) == 2 and item["step_label"][pos].tolist() == [1.0, 0.0]
    assert all(tok.decode([int(item["tokens"][p])]).endswith("\n\n") for p in pos)
    assert tok.decode(item["tokens"][pos[0] + 1:pos[1] + 1].tolist()) == "3 + 3 = 7\n\n"


def test_processbench_prediction_and_f1():
    from posttrain.prm import earliest_error, processbench_f1

    assert earliest_error([0.9, 0.8, 0.3, 0.1]) == 2 and earliest_error([0.9, 0.6]) == -1
    assert math.isclose(processbench_f1(0.5, 1.0), 2 / 3) and processbench_f1(0.0, 1.0) == 0.0


def test_processbench_step_scored_exactly_one_half_is_wrong():
    """ProcessBench's script takes argmax over the (wrong, correct) logits: equal logits (P = 0.5)
    give index 0, "wrong". Only P(correct) > 0.5 is a correct step."""
    import torch

    from posttrain.prm import earliest_error

    assert earliest_error([0.9, 0.5, 0.9]) == 1
    assert earliest_error([0.5]) == 0
    assert earliest_error([0.9, 0.5000001]) == -1
    assert earliest_error([float(torch.sigmoid(torch.tensor(0.0)))]) == 0  # a zero logit
    # The official rule, on two-class logits: first step whose argmax is 0.
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.0, 3.0]])
    official = next((k for k, c in enumerate(torch.argmax(logits, dim=-1).tolist()) if c == 0), -1)
    assert earliest_error(torch.softmax(logits, -1)[:, 1].tolist()) == official == 1


def _prm_batch(rank, world_size, overrides):
    cfg, stage, model, batch = stage_batch("prm", world_size, overrides)
    out, loss_func = stage.forward_step(iter([batch]), model)
    loss_sum, n, _ = loss_func(out)
    return loss_sum.item(), int(n), out.detach().squeeze(-1), batch


def test_prm_loss_matches_torch_at_tp1_and_tp2():
    (loss, n, logits, batch), = run_on_ranks(_prm_batch, 1, PRM)
    hand, count = 0.0, 0
    for b, s in torch.nonzero(batch["step_mask"]).tolist():
        z, y = logits[b, s].item(), batch["step_label"][b, s].item()
        hand += -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
        count += 1
    assert n == count > 4 and math.isclose(loss, hand, rel_tol=1e-5), (loss, hand)
    for got, n2, _, _ in run_on_ranks(_prm_batch, 2, PRM + ["parallel.tp=2"]):
        assert n2 == n and math.isclose(got, hand, rel_tol=1e-5), (got, hand)


def _datasets(tmp_path, rows):
    from megatron_ext.cli import load_config
    from posttrain.prm import PRMStage

    path = tmp_path / "prm.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cfg = load_config(["stage=prm", *PRM, f"posttrain.data_path={path}"])
    return PRMStage(cfg).datasets(cfg, 4, 0)[0], path


def test_rows_without_step_labels_use_the_processbench_label(tmp_path):
    rows = [{"problem": "Add: 1 + 2 + 3", "steps": ["1 + 2 = 3", "3 + 3 = 7", "7 + 0 = 7"], "label": 1},
            {"problem": "Add: 1 + 1", "steps": ["1 + 1 = 2"], "label": -1},
            {"problem": "Add: 2 + 2", "steps": ["2 + 2 = 5"], "step_labels": [0], "label": 0}]
    train, _ = _datasets(tmp_path, rows)
    got = [train.items[i]["step_label"][train.items[i]["step_mask"].bool()].tolist() for i in range(3)]
    assert got == [[1.0, 0.0], [1.0], [0.0]]  # after the first error the steps stay unlabelled
    assert all(int(item["pb_label"]) == -2 for item in train.items)  # no ProcessBench metrics in training


@pytest.mark.parametrize("row, message", [
    ({"problem": "p", "steps": ["a", "b"]}, "neither 'step_labels'.* nor a ProcessBench 'label'"),
    ({"problem": "p", "steps": ["a", "b"], "label": 2}, "'label'=2 must be an integer in \\[-1, 1\\]"),
    ({"problem": "p", "steps": ["a"], "step_labels": [1, 0]}, "'step_labels' must be a list of at most 1"),
    ({"problem": "p", "steps": "a", "label": -1}, "non-empty list of string 'steps'"),
])
def test_bad_prm_rows_are_named_by_file_and_line(tmp_path, row, message):
    good = {"problem": "p", "steps": ["a"], "step_labels": [1]}
    with pytest.raises(ValueError, match=message) as info:
        _datasets(tmp_path, [good, "", row])
    assert str(info.value).startswith(f"{tmp_path / 'prm.jsonl'}:3: ")


def test_processbench_f1_reaches_the_loop_metrics():
    """The loop calls the stage's derive_metrics on the reduced means (train and validation)."""
    from posttrain.prm import PRMStage

    got = PRMStage.derive_metrics({"loss": 0.3, "error_subset_acc": 0.5, "correct_subset_acc": 1.0})
    assert math.isclose(got["processbench_f1"], 2 / 3)
    assert "processbench_f1" not in PRMStage.derive_metrics({"loss": 0.3, "error_subset_acc": None,
                                                             "correct_subset_acc": 1.0})
