"""Checkpoints: bit-identical resume, crash/preemption safety, corruption, resharding, NaN guard."""

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.gloo import RankFailure, run_on_ranks
from tests.test_train import full_params

BASE = ["train.steps=4", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=1",
        "data.seq_length=32", "checkpoint.keep_last=0"]


def _run(rank, world_size, overrides, stage_factory=None):
    """Train (resuming as configured); return history, final state and full params."""
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    cfg = load_config(overrides)
    validate(cfg, world_size)
    result = train(cfg, (stage_factory or PretrainStage)())
    return result.history, result.state.step, full_params(result.runtime.model)


def _assert_same_run(ref, got, exact=True):
    (ref_hist, _, ref_params), (hist, _, params) = ref, got
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], rel=0 if exact else 1e-5)
    assert [h["grad_norm"] for h in hist] == pytest.approx([h["grad_norm"] for h in ref_hist],
                                                         rel=0 if exact else 1e-4)
    for name, ref_param in ref_params.items():
        if exact:
            assert torch.equal(params[name], ref_param), name
        else:
            torch.testing.assert_close(params[name], ref_param, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"]], ids=["dp2", "tp2"])
def test_resume_is_bit_identical(tmp_path, layout):
    ckpt = ["checkpoint.dir=" + str(tmp_path)]
    straight = run_on_ranks(_run, 2, BASE + layout)
    first = run_on_ranks(_run, 2, BASE + layout + ckpt + ["train.exit_interval=2"])
    assert first[0][1] == 2 and (tmp_path / "iter_0000002" / "meta.json").exists()
    resumed = run_on_ranks(_run, 2, BASE + layout + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])


class _KillDuringSecondSave:
    """Rank 1 SIGKILLs itself while writing the step-4 checkpoint (after the state files)."""

    def __init__(self):
        import megatron_ext.checkpoint as ck

        original = ck.torch.save

        def save(obj, path, *args, **kwargs):
            original(obj, path, *args, **kwargs)
            if "iter_0000004.tmp" in str(path) and torch.distributed.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        ck.torch.save = save
        from megatron_ext.pretrain import PretrainStage

        self.stage = PretrainStage()

    def datasets(self, *args):
        return self.stage.datasets(*args)

    def forward_step(self, *args):
        return self.stage.forward_step(*args)


def test_kill_during_save_resumes_from_previous(tmp_path):
    ckpt = ["checkpoint.dir=" + str(tmp_path), "checkpoint.save_interval=2"]
    straight = run_on_ranks(_run, 2, BASE)
    # Rank 1 dies; rank 0 fails in the next collective (or the harness sees the dead rank first).
    with pytest.raises(RankFailure, match="died with exit code -9|Connection closed by peer"):
        run_on_ranks(_run, 2, BASE + ckpt, _KillDuringSecondSave)
    assert (tmp_path / "iter_0000004.tmp").exists() and not (tmp_path / "iter_0000004").exists()
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    resumed = run_on_ranks(_run, 2, BASE + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])
    assert (tmp_path / "iter_0000004" / "meta.json").exists() and not (tmp_path / "iter_0000004.tmp").exists()


class _SigtermRank1AtStep2:
    def __init__(self):
        from megatron_ext.pretrain import PretrainStage

        self.stage, self.calls = PretrainStage(), 0

    def datasets(self, *args):
        return self.stage.datasets(*args)

    def forward_step(self, data_iterator, model):
        self.calls += 1
        if self.calls == 3 and torch.distributed.get_rank() == 1:  # during step 2 (2 micro-batches/step)
            os.kill(os.getpid(), signal.SIGTERM)
        return self.stage.forward_step(data_iterator, model)


def _run_until_preempted(rank, world_size, overrides):
    from megatron_ext.fault import Preempted

    try:
        _run(rank, world_size, overrides, _SigtermRank1AtStep2)
    except Preempted as e:
        return e.code
    return None


def test_sigterm_on_one_rank_saves_and_requeues(tmp_path):
    from megatron_ext.fault import REQUEUE_EXIT_CODE

    ckpt = ["checkpoint.dir=" + str(tmp_path)]
    codes = run_on_ranks(_run_until_preempted, 2, BASE + ckpt)
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002"]
    straight = run_on_ranks(_run, 2, BASE)
    resumed = run_on_ranks(_run, 2, BASE + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])
