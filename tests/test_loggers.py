"""One metrics path: the loop reduces every reported metric, and logger.metrics_file keeps them
at full precision, one jsonl record per step and per evaluation, appended on resume."""

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.pretrain import PretrainStage
from tests.forked_ranks import run_on_ranks

SHORT = ["train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_length=32",
         "train.eval_interval=2", "train.eval_iters=1"]


class _ReportsThree(PretrainStage):
    """Pretraining with one extra metric in the report, and a derived one."""

    def forward_step(self, data_iterator, model):
        output, loss_func = super().forward_step(data_iterator, model)

        def with_share(output_tensor):
            loss_sum, tokens, reports = loss_func(output_tensor)
            reports["three"] = torch.tensor([3.0, 1.0])  # each micro-batch reports 3 over a count of 1
            return loss_sum, tokens, reports

        return output, with_share

    @staticmethod
    def derive_metrics(metrics):
        return {**metrics, "six": 2 * metrics["three"]}


def _train(rank, world_size, overrides, extra_metric=False):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    cfg = load_config(overrides)
    validate(cfg, world_size)
    return train(cfg, _ReportsThree() if extra_metric else PretrainStage()).history


def _records(path: Path):
    """The file's records without throughput (timing differs between runs)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r.pop("tokens/s", None)
    return records


def test_metrics_file_records_every_step_and_evaluation_and_resumes(tmp_path):
    jsonl, ckpt = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    base = SHORT + [f"logger.metrics_file={jsonl}", f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2",
                    "checkpoint.keep_last=0"]
    history, = run_on_ranks(_train, 1, base)
    first = _records(jsonl)
    assert [(r["step"], r["kind"]) for r in first] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"),
                                                       (4, "train"), (4, "eval")]
    train_records = [r for r in first if r["kind"] == "train"]
    assert [r["lm_loss"] for r in train_records] == [h["loss"] for h in history]  # full precision
    assert [r["grad_norm"] for r in train_records] == [h["grad_norm"] for h in history]
    assert [r["val_loss"] for r in first if r["kind"] == "eval"] == [history[1]["val_loss"], history[3]["val_loss"]]

    # A run that died after step 4 but resumes from the step-2 checkpoint: the records of steps
    # 3-4 are replaced by the resumed run's, which equal them (resume is exact).
    resumed, = run_on_ranks(_train, 1, base + [f"checkpoint.load={ckpt}/iter_0000002"])
    assert [h["loss"] for h in resumed] == [h["loss"] for h in history[2:]]
    assert _records(jsonl) == first


def test_stage_metrics_take_the_loop_path_under_pipeline_parallelism(tmp_path):
    """A stage's extra report and its derived metric reach every rank's history (rank 0 is the
    first pipeline stage, which has no reports of its own) and the file, train and eval."""
    jsonl = tmp_path / "m.jsonl"
    runs = run_on_ranks(_train, 2, SHORT + ["parallel.pp=2", f"logger.metrics_file={jsonl}"], True)
    for history in runs:
        assert [h["three"] for h in history] == [3.0] * 4
        assert [h["six"] for h in history] == [6.0] * 4
        assert history[1]["val_three"] == 3.0 and history[1]["val_six"] == 6.0
    records = _records(jsonl)
    assert [r["three"] for r in records if r["kind"] == "train"] == [3.0] * 4
    assert [r["val_six"] for r in records if r["kind"] == "eval"] == [6.0, 6.0]


def test_metrics_file_that_is_not_one_is_refused(tmp_path):
    from megatron_ext.loggers import open_metrics_file

    bad = tmp_path / "notes.txt"
    bad.write_text("my notes\n")
    with pytest.raises(ValueError, match="notes.txt: not a metrics file"):
        open_metrics_file(bad, 0)
    assert bad.read_text() == "my notes\n"  # nothing lost
