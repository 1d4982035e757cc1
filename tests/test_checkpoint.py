"""Checkpoints: bit-identical resume, crash/preemption safety, corruption, resharding, NaN guard."""

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from megatron_ext.pretrain import PretrainStage
from megatron_ext.stages import LOSS
from tests.forked_ranks import RankFailure, run_on_ranks
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


@pytest.fixture(scope="module")
def straight():
    """BASE on 2 ranks (DP=2), 4 steps, no checkpointing: the reference of every DP=2 resume."""
    return run_on_ranks(_run, 2, BASE)


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory):
    """4 steps on 2 ranks with a synchronous save after every step: (per-rank results, root)."""
    root = tmp_path_factory.mktemp("sync_reference")
    return run_on_ranks(_run, 2, BASE + [f"checkpoint.dir={root}", "checkpoint.save_interval=1"]), root


def test_saving_does_not_change_training(straight, sync_reference):
    """A save after every step leaves losses, gradients and parameters bit-identical to a run that
    never saves (so the saving runs below may serve as references for each other)."""
    for rank in range(2):
        _assert_same_run(straight[rank], sync_reference[0][rank])


# 2 steps before and 2 after the save: the resumed run's first step already needs the restored
# weights, Adam moments, scheduler, RNG and data position (any one lost changes its loss or its
# update), and its second step needs the state its own first step left; more steps add nothing.
@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"], ["parallel.distributed_optimizer=true"]],
                         ids=["dp2", "tp2", "dp2_distributed_optimizer"])
def test_resume_is_bit_identical(tmp_path, layout, request):
    ckpt = ["checkpoint.dir=" + str(tmp_path)]
    # The DP=2 layout is BASE itself: its straight run is shared with the other DP=2 tests.
    straight = request.getfixturevalue("straight") if layout == ["parallel.tp=1"] else \
        run_on_ranks(_run, 2, BASE + layout)
    first = run_on_ranks(_run, 2, BASE + layout + ckpt + ["train.exit_interval=2"])
    assert first[0][1] == 2 and (tmp_path / "iter_0000002" / "meta.json").exists()
    resumed = run_on_ranks(_run, 2, BASE + layout + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])


class _KillDuringSecondSave(PretrainStage):
    """Rank 1 SIGKILLs itself while writing the step-4 checkpoint (after the state files)."""

    def __init__(self):
        import megatron_ext.checkpoint.store as ck  # where the RNG files are written

        original = ck.torch.save

        def save(obj, path, *args, **kwargs):
            original(obj, path, *args, **kwargs)
            if "iter_0000004.tmp" in str(path) and torch.distributed.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        ck.torch.save = save
        super().__init__()


def test_kill_during_save_resumes_from_previous(tmp_path, straight):
    ckpt = ["checkpoint.dir=" + str(tmp_path), "checkpoint.save_interval=2"]
    # Rank 1 dies; rank 0 fails in the next collective; the harness names the dead rank either way.
    with pytest.raises(RankFailure, match="died with exit code -9"):
        run_on_ranks(_run, 2, BASE + ckpt, _KillDuringSecondSave)
    assert (tmp_path / "iter_0000004.tmp").exists() and not (tmp_path / "iter_0000004").exists()
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    resumed = run_on_ranks(_run, 2, BASE + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])
    assert (tmp_path / "iter_0000004" / "meta.json").exists() and not (tmp_path / "iter_0000004.tmp").exists()


class _SigtermRank1AtStep2(PretrainStage):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward_step(self, data_iterator, model):
        self.calls += 1
        if self.calls == 3 and torch.distributed.get_rank() == 1:  # during step 2 (2 micro-batches/step)
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward_step(data_iterator, model)


def _run_until_preempted(rank, world_size, overrides):
    from megatron_ext.fault import Preempted

    try:
        _run(rank, world_size, overrides, _SigtermRank1AtStep2)
    except Preempted as e:
        return e.code
    return None


def test_sigterm_on_one_rank_saves_and_requeues(tmp_path, straight):
    from megatron_ext.fault import REQUEUE_EXIT_CODE

    ckpt = ["checkpoint.dir=" + str(tmp_path)]
    codes = run_on_ranks(_run_until_preempted, 2, BASE + ckpt)
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002"]
    resumed = run_on_ranks(_run, 2, BASE + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(ckpt: Path) -> Path:
    return sorted((ckpt / "state").glob("*.distcp"))[0]


CORRUPTIONS = {
    "flipped byte in a shard": (lambda c: _flip_byte(_shard(c)), lambda c: _shard(c).name),
    "deleted shard": (lambda c: _shard(c).unlink(), lambda c: "missing"),
    "truncated metadata": (lambda c: (c / "meta.json").write_text((c / "meta.json").read_text()[:200]),
                           lambda c: "meta.json"),
    "flipped byte in megatron metadata": (lambda c: _flip_byte(c / "state" / ".metadata"), lambda c: ".metadata"),
}


def _corruption_table(rank, world_size, root):
    import shutil

    from megatron_ext import checkpoint
    from megatron_ext.checkpoint import CheckpointError

    _, _, _ = _run(rank, world_size, BASE + [f"checkpoint.dir={root}/good", "checkpoint.save_interval=2"])
    from megatron_ext.cli import load_config
    from megatron_ext.build import build

    rt = build(load_config(BASE))
    outcomes = {}
    for name, (corrupt, expected_in_message) in CORRUPTIONS.items():
        case = Path(root) / name.replace(" ", "_")
        shutil.copytree(Path(root) / "good", case)
        corrupt(case / "iter_0000004")
        rt.config.checkpoint.dir, rt.config.checkpoint.load = str(case), str(case / "iter_0000004")
        try:
            checkpoint.resume(rt)
            explicit = "loaded"
        except CheckpointError as e:
            explicit = str(e)
        rt.config.checkpoint.load = "auto"
        auto_step = checkpoint.resume(rt).step
        outcomes[name] = (explicit, expected_in_message(case / "iter_0000004"), auto_step)
    # Garbage pointer: scanning still finds the newest good checkpoint.
    (Path(root) / "good" / "latest").write_bytes(b"\x00\xffgarbage")
    rt.config.checkpoint.dir, rt.config.checkpoint.load = f"{root}/good", "auto"
    outcomes["garbage pointer"] = (None, None, checkpoint.resume(rt).step)
    # Every checkpoint corrupted: auto-resume refuses to start from scratch.
    case = Path(root) / "flipped_byte_in_a_shard"
    _flip_byte(_shard(case / "iter_0000002"))
    rt.config.checkpoint.dir = str(case)
    try:
        checkpoint.resume(rt)
        outcomes["all corrupted"] = "resumed"
    except CheckpointError as e:
        outcomes["all corrupted"] = str(e)
    return outcomes


def test_corruption_is_detected_and_skipped(tmp_path):
    (outcomes,) = run_on_ranks(_corruption_table, 1, str(tmp_path))
    for name in CORRUPTIONS:
        explicit, fragment, auto_step = outcomes[name]
        assert explicit != "loaded" and fragment in explicit, (name, explicit)
        assert auto_step == 2, f"{name}: auto-resume should fall back to step 2"
    assert outcomes["garbage pointer"][2] == 4
    assert "every checkpoint" in outcomes["all corrupted"]


def test_cli_never_exits_0_on_a_corrupted_checkpoint(tmp_path, four_steps):
    """`python -m megatron_ext.train` asked to load a checkpoint with a corrupted shard exits 1 and
    says why. (The checkpoint is a copy of the shared 4-step run's step-2 save: how it was
    written does not matter here, only what the CLI does with it.)"""
    import shutil
    import subprocess
    import sys

    _, saved = four_steps
    shutil.copytree(saved / "iter_0000002", tmp_path / "iter_0000002")
    _flip_byte(_shard(tmp_path / "iter_0000002"))
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *SCHEDULE,
                           f"checkpoint.load={tmp_path}/iter_0000002"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr, proc.stderr[-2000:]


def _logits_after_load(rank, world_size, overrides, tokens):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_ext import checkpoint
    from megatron_ext.build import build
    from megatron_ext.cli import load_config

    rt = build(load_config(overrides))
    checkpoint.resume(rt)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def forward_step(data_iterator, model):
        return model(tokens, positions, attention_mask=None), lambda out, non_loss_data=True: out

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[None] * len(rt.model) if len(rt.model) > 1 else None,
        model=rt.model, num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
        forward_only=True, collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return gather_from_tensor_model_parallel_region(outputs[0]).detach()


def _logits_then_continue(rank, world_size, load, tokens, cont):
    """Logits of the checkpoint loaded at this layout, then the loss of one more training step
    from it at the same layout: (logits on the last pipeline stage, that step's loss)."""
    logits = _logits_after_load(rank, world_size, load, tokens)
    return logits, _run(rank, world_size, cont)[0][0]["loss"]


def test_reshard_tp2_to_tp1_and_pp2(tmp_path):
    save = BASE + ["train.steps=2", f"checkpoint.dir={tmp_path}", "parallel.tp=2"]
    run_on_ranks(_run, 2, save)
    tokens = torch.randint(0, 151000, (2, 16), generator=torch.Generator().manual_seed(0))
    # BASE trains 4 steps, the checkpoint's run 2: the longer schedule is asked for.
    load = BASE + [f"checkpoint.load={tmp_path}/iter_0000002", "checkpoint.override_schedule=true"]
    # Training continues at the new layouts the same way it does at the saved one. Each layout
    # loads (for the logits) and then trains (a fresh build that loads again) in one process.
    cont = BASE + ["train.steps=3", f"checkpoint.load={tmp_path}/iter_0000002", "checkpoint.override_schedule=true"]
    ref, ref_loss = run_on_ranks(_logits_then_continue, 2, load + ["parallel.tp=2"], tokens,
                                 cont + ["parallel.tp=2"])[0]
    tp1, tp1_loss = run_on_ranks(_logits_then_continue, 1, load, tokens, cont)[0]
    pp2_ranks = run_on_ranks(_logits_then_continue, 2, load + ["parallel.pp=2"], tokens, cont + ["parallel.pp=2"])
    pp2, pp2_loss = pp2_ranks[1][0], pp2_ranks[0][1]  # logits of the last stage, loss as rank 0 logs it
    torch.testing.assert_close(tp1, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pp2, ref, rtol=1e-5, atol=1e-5)
    assert tp1_loss == pytest.approx(ref_loss, rel=1e-5) and pp2_loss == pytest.approx(ref_loss, rel=1e-5)


class _NanOnRank1AtStep2(PretrainStage):
    def __init__(self):
        super().__init__()
        self.calls, self.before = 0, None

    def forward_step(self, data_iterator, model):
        self.calls += 1
        output, loss_func = super().forward_step(data_iterator, model)
        if self.calls == 3:  # first micro-batch of step 2: remember the parameters
            self.model, self.before = model, {k: v.detach().clone() for k, v in model.named_parameters()}
        if self.calls == 3 and torch.distributed.get_rank() == 1:
            output = output * float("nan")
        return output, loss_func


def _nan_run(rank, world_size, overrides):
    from megatron_ext.fault import NonFiniteError

    stage = _NanOnRank1AtStep2()
    from megatron_ext.cli import load_config
    from megatron_ext.loop import train

    try:
        train(load_config(overrides), stage)
        return "no error", False
    except NonFiniteError as e:
        unchanged = all(torch.equal(v, stage.before[k]) for k, v in stage.model.named_parameters())
        return str(e), unchanged


def test_injected_nan_stops_before_the_update():
    for message, unchanged in run_on_ranks(_nan_run, 2, BASE):
        assert "non-finite loss on rank(s) [1] at step 2" in message
        assert unchanged


def test_local_status_names_the_first_non_finite_kind():
    """0 finite, 1 a non-finite gradient (inf or NaN anywhere in any buffer, expert buffers
    included), 2 a non-finite loss (whatever the gradients); no reports (a non-last pipeline
    stage) judge the gradients only."""
    from types import SimpleNamespace

    from megatron_ext.fault import _local_status

    def chunk(*grads, expert=()):
        wrap = lambda ts: [SimpleNamespace(grad_data=t) for t in ts]  # noqa: E731
        return SimpleNamespace(buffers=wrap(grads), expert_parallel_buffers=wrap(expert))

    finite = [torch.randn(1000), torch.randn(7)]
    report = {LOSS: torch.tensor([3.0, 16.0])}
    poisoned = lambda value, at: torch.cat([finite[0][:at], torch.tensor([value]), finite[0][at:]])  # noqa: E731
    cases = [
        ([chunk(*finite)], [report, report], 0),
        ([chunk(*finite)], [], 0),
        ([chunk(finite[0], poisoned(float("inf"), 999))], [report], 1),
        ([chunk(*finite), chunk(finite[1], expert=[poisoned(float("nan"), 0)])], [report], 1),
        ([chunk(finite[0], torch.empty(0), poisoned(-float("inf"), 3))], [], 1),
        ([chunk(*finite)], [report, {LOSS: torch.tensor([float("nan"), 16.0])}], 2),
        ([chunk(poisoned(float("nan"), 5))], [{LOSS: torch.tensor([float("inf"), 1.0])}], 2),
    ]
    for i, (model, reports, expected) in enumerate(cases):
        status = _local_status(model, reports)
        assert status.dtype == torch.int32 and status.dim() == 0 and int(status) == expected, i


# ---------------------------------------------------------------- resume policy for schedule keys

SCHEDULE = ["train.steps=4", "train.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
            "data.seq_length=32", "checkpoint.keep_last=0"]


def test_schedule_changes_name_the_changed_keys():
    from megatron_ext.checkpoint import schedule_changes
    from megatron_ext.cli import load_config
    from omegaconf import OmegaConf

    saved = {"config": OmegaConf.to_container(OmegaConf.structured(load_config(SCHEDULE)))}
    assert schedule_changes(load_config(SCHEDULE), saved) == []
    changed = load_config(SCHEDULE + ["train.steps=6", "train.lr=1e-2", "train.min_lr=0", "train.warmup_steps=2",
                                      "train.lr_schedule=linear", "train.weight_decay=0.0"])
    assert schedule_changes(changed, saved) == [
        ("train.steps", 4, 6), ("train.lr", 0.005, 0.01), ("train.min_lr", 0.0005, 0.0),
        ("train.warmup_steps", 1, 2), ("train.lr_schedule", "cosine", "linear"), ("train.weight_decay", 0.1, 0.0)]
    # wsd_decay_steps shapes only the WSD schedule.
    assert schedule_changes(load_config(SCHEDULE + ["train.wsd_decay_steps=2"]), saved) == []
    wsd = load_config(SCHEDULE + ["train.lr_schedule=wsd", "train.wsd_decay_steps=2"])
    assert [k for k, _, _ in schedule_changes(wsd, saved)] == ["train.lr_schedule", "train.wsd_decay_steps"]
    # Keys outside the schedule do not count.
    assert schedule_changes(load_config(SCHEDULE + ["train.clip_grad=0.5", "logger.log_interval=2"]), saved) == []


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A 4-step cosine run on one rank, saved at step 2 and at the end."""
    root = tmp_path_factory.mktemp("four_steps")
    (result,) = run_on_ranks(_run, 1, SCHEDULE + [f"checkpoint.dir={root}", "checkpoint.save_interval=2"])
    assert result[1] == 4 and (root / "iter_0000004").is_dir()
    return result, root


def test_resume_with_a_changed_schedule_is_refused(four_steps):
    """The command line of a longer run on the same checkpoint exits 1 and names each change."""
    import subprocess
    import sys

    _, root = four_steps
    before = sorted(p.name for p in root.iterdir())
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *SCHEDULE, f"checkpoint.dir={root}",
                           "checkpoint.save_interval=2", "train.steps=6", "train.lr=0.01", "checkpoint.load=auto"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "iter_0000004: resuming at step 4 would change the LR schedule" in proc.stderr, proc.stderr[-3000:]
    assert "train.steps: checkpoint 4, config 6" in proc.stderr
    assert "train.lr: checkpoint 0.005, config 0.01" in proc.stderr
    assert "set checkpoint.override_schedule=true to apply the new schedule from step 5 on" in proc.stderr
    assert "step      5/6" not in proc.stderr and sorted(p.name for p in root.iterdir()) == before


def test_override_schedule_applies_the_new_schedule_from_the_resumed_step(four_steps, tmp_path, caplog):
    """With checkpoint.override_schedule=true, steps 5-6 get the LR a fresh run of the new config
    has at steps 5-6 (new peak LR included), not the old schedule's min_lr."""
    from megatron_ext.build import lr_scheduler
    from megatron_ext.cli import load_config

    (old_history, _, _), root = four_steps
    new = ["train.steps=6", "train.lr=0.01", "train.min_lr=0.0001"]
    cfg = load_config(SCHEDULE + new)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched, fresh = lr_scheduler(opt, cfg.train), []
    for _ in range(cfg.train.steps):
        fresh.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    load = [f"checkpoint.load={root / 'iter_0000004'}", f"checkpoint.dir={tmp_path}"]
    (history, step, _), = run_on_ranks(_run, 1, SCHEDULE + new + load + ["checkpoint.override_schedule=true"])
    assert step == 6 and len(history) == 2
    assert [h["lr"] for h in history] == pytest.approx(fresh[4:], rel=1e-12, abs=0)
    assert [h["lr"] for h in old_history] != pytest.approx(fresh[:4])  # the schedules really differ
    assert old_history[-1]["lr"] == pytest.approx(5e-4) and history[0]["lr"] > 2 * 5e-4
    import json

    saved = json.loads((tmp_path / "iter_0000006" / "meta.json").read_text())
    assert saved["config"]["train"]["steps"] == 6 and saved["scheduler"]["max_lr"] == 0.01


# ---------------------------------------------------------------- async save (checkpoint.async_save)

ASYNC = ["checkpoint.async_save=true"]


def _saved_tensors(ckpt: Path, scratch: Path) -> dict:
    """Every tensor (model and optimizer) of a checkpoint's torch_dist directory, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{ckpt.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "state", out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}


def _assert_same_checkpoint(got: Path, ref: Path, scratch: Path):
    import json

    saved, expected = _saved_tensors(got, scratch), _saved_tensors(ref, scratch)
    assert sorted(saved) == sorted(expected) and any(k.startswith("optimizer.") for k in saved)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), f"{got}: {key} differs from {ref}"
    meta, ref_meta = (json.loads((c / "meta.json").read_text()) for c in (got, ref))
    assert (meta["train_state"], meta["scheduler"]) == (ref_meta["train_state"], ref_meta["scheduler"])


def test_async_save_resume_is_bit_identical(tmp_path, sync_reference):
    straight, ref_root = sync_reference
    ckpt = ["checkpoint.dir=" + str(tmp_path)] + ASYNC
    first = run_on_ranks(_run, 2, BASE + ckpt + ["train.exit_interval=2"])
    assert first[0][1] == 2 and (tmp_path / "latest").read_text().strip() == "iter_0000002"
    resumed = run_on_ranks(_run, 2, BASE + ckpt + ["checkpoint.load=auto"])
    for rank in range(2):
        ref_hist, ref_step, ref_params = straight[rank]
        _assert_same_run((ref_hist[2:], ref_step, ref_params), resumed[rank])
    _assert_same_checkpoint(tmp_path / "iter_0000004", ref_root / "iter_0000004", tmp_path)


class _SlowStep2Writer(PretrainStage):
    """The background writer of the step-2 save waits until this rank has run the optimizer
    update of step 3 (marked by the first micro-batch of step 4), so the save can only hold the
    step-2 tensors if they were snapshotted when it started."""

    def __init__(self, gate: str):
        import time

        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        super().__init__()
        self.calls, self.gate = 0, Path(gate)
        original = FileSystemWriterAsync.write_preloaded_data_multiproc

        def write(transform_list, use_msc, rank, write_buckets, results_queue):  # runs in the forked writer
            if any("iter_0000002.tmp" in str(bucket[0]) for bucket in write_buckets):
                deadline = time.monotonic() + 120
                while not (self.gate / f"rank{rank}").exists():
                    assert time.monotonic() < deadline, "training did not reach step 4 during the step-2 write"
                    time.sleep(0.05)
            original(transform_list, use_msc, rank, write_buckets, results_queue)

        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write)

    def forward_step(self, data_iterator, model):
        self.calls += 1
        if self.calls == 7:  # first micro-batch of step 4 (2 per step): step 3's update is done
            self.gate.mkdir(exist_ok=True)
            (self.gate / f"rank{torch.distributed.get_rank()}").touch()
        return super().forward_step(data_iterator, model)


def test_async_save_holds_the_tensors_of_its_step(tmp_path, sync_reference):
    import functools

    straight, ref_root = sync_reference
    root = tmp_path / "ckpt"
    stage = functools.partial(_SlowStep2Writer, str(tmp_path / "gate"))
    got = run_on_ranks(_run, 2, BASE + [f"checkpoint.dir={root}", "checkpoint.save_interval=2"] + ASYNC, stage)
    assert all((tmp_path / "gate" / f"rank{r}").exists() for r in range(2))
    for rank in range(2):
        _assert_same_run(straight[rank], got[rank])
    # Byte-equal to the synchronous save of step 2, although steps 3 and 4 ran while it was written.
    _assert_same_checkpoint(root / "iter_0000002", ref_root / "iter_0000002", tmp_path)
    _assert_same_checkpoint(root / "iter_0000004", ref_root / "iter_0000004", tmp_path)
    step2, step4 = (_saved_tensors(root / name, tmp_path) for name in ("iter_0000002", "iter_0000004"))
    assert not torch.equal(step2["output_layer.weight"], step4["output_layer.weight"])


def test_async_save_every_step_keeps_the_newest(tmp_path, sync_reference):
    _, ref_root = sync_reference
    root = tmp_path / "ckpt"
    overrides = BASE + [f"checkpoint.dir={root}", "checkpoint.save_interval=1", "checkpoint.keep_last=2"]
    assert run_on_ranks(_run, 2, overrides + ASYNC)[0][1] == 4
    # Returning from train means the last save is committed and retention has run.
    # (the dataset index cache lives beside the checkpoints: data.cache_dir's default)
    assert sorted(p.name for p in root.iterdir() if p.name != "cache") == ["iter_0000003", "iter_0000004", "latest"]
    assert (root / "latest").read_text().strip() == "iter_0000004"
    for name in ("iter_0000003", "iter_0000004"):
        _assert_same_checkpoint(root / name, ref_root / name, tmp_path)


def test_async_save_on_preemption_is_committed_before_exit(tmp_path, sync_reference):
    from megatron_ext.fault import REQUEUE_EXIT_CODE

    _, ref_root = sync_reference
    root = tmp_path / "ckpt"
    codes = run_on_ranks(_run_until_preempted, 2, BASE + [f"checkpoint.dir={root}"] + ASYNC)
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    assert sorted(p.name for p in root.iterdir() if p.name != "cache") == ["iter_0000002", "latest"]
    assert (root / "latest").read_text().strip() == "iter_0000002"
    _assert_same_checkpoint(root / "iter_0000002", ref_root / "iter_0000002", tmp_path)


def _adam_state_after_resume(rank, world_size, overrides):
    from megatron_ext import checkpoint
    from megatron_ext.build import build
    from megatron_ext.cli import load_config

    rt = build(load_config(overrides))
    checkpoint.resume(rt)
    inner = [opt.optimizer for opt in rt.optimizer.chained_optimizers]
    params = [p for opt in inner for group in opt.param_groups for p in group["params"]]
    steps = [opt.state[p]["step"] for opt in inner for group in opt.param_groups for p in group["params"]]
    return ([group["fused"] for opt in inner for group in opt.param_groups], [float(s) for s in steps],
            len({id(s) for s in steps}), len(params), all(s.device == p.device for s, p in zip(steps, params)))


def test_resumed_adam_runs_fused_with_a_step_per_parameter(four_steps):
    """After a resume torch's Adam runs fused again, and each parameter has its own step tensor on
    its device holding the saved count (one shared tensor would advance once per parameter)."""
    _, root = four_steps
    ((fused, steps, distinct, n_params, on_device),) = run_on_ranks(
        _adam_state_after_resume, 1, SCHEDULE + [f"checkpoint.load={root}/iter_0000002"])
    assert fused and all(fused)
    assert steps == [2.0] * n_params and distinct == n_params and on_device


def _graph_safe_rng_round_trip(rank, world_size):
    """A tracker holding generators (graph-safe, as with train.cuda_graph): the checkpoint saves
    their states as tensors and restores them into the same generator objects."""
    import io

    from megatron.core import tensor_parallel

    from megatron_ext.build import init_parallel
    from megatron_ext.checkpoint import store
    from megatron_ext.cli import load_config

    init_parallel(load_config([]))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    generator = torch.Generator().manual_seed(3)
    tracker.set_states({"model-parallel-rng": generator})
    state = store._rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    expected = torch.rand(4, generator=generator)
    torch.rand(7, generator=generator)  # moves on
    buffer.seek(0)
    store._set_rng_state(torch.load(buffer, weights_only=False))
    restored = tracker.get_states()["model-parallel-rng"]
    return isinstance(state["tracker"]["model-parallel-rng"], torch.Tensor), restored is generator, \
        torch.equal(torch.rand(4, generator=restored), expected)


def test_graph_safe_rng_states_round_trip_in_place():
    from tests.forked_ranks import run_on_ranks

    ((saved_as_tensor, same_object, same_draws),) = run_on_ranks(_graph_safe_rng_round_trip, 1)
    assert saved_as_tensor and same_object and same_draws
