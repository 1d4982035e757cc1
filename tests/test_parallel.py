"""Every parallel layout trains exactly like one process (fp32, gloo, CPU).

Every run starts from scratch: the initial weights depend on the seed only, not on the layout
(megatron_ext.init; tests/test_init.py checks that bit for bit). Each layout trains 3 steps and
saves; the final checkpoints are loaded back into one process for the comparison, so the
resharding of dist_checkpointing is part of what is checked.

What is compared, and why it holds on any CPU kernel path (AVX-512, AVX2, no vector units;
MKL or not). A layout sums the same numbers in a different order, so its gradients differ
from one process's by fp32 rounding noise. Losses and grad norms are linear in that noise and
are compared tightly (the grad norm after step 1 a little less so: it is computed on weights
that already carry the Adam effect below). Adam is not: its first step is lr * g / (|g| + eps), about lr * sign(g),
so wherever a gradient is itself at the noise level (vocabulary rows that no token of the batch
touched, heavy cancellation) the noise flips the update between +lr and -lr, and the changed
logits spread percent-level differences to the other untouched rows in later steps. So the
final weights are checked in two parts, using the gradients the single-process run recorded
before each optimizer step:
- determined elements, whose gradient is at least NOISE_FLOOR times the tensor's RMS gradient
  at every step: noise moves their update by a tiny fraction of lr, so they must agree within
  DETERMINED_TOL * sum(lr) (a real bug moves them by a good fraction of lr);
- every element: Adam moves an element by at most lr per step (|m_hat / sqrt(v_hat)| <= 1.001
  for beta1=0.9, beta2=0.95 over these steps, by Cauchy-Schwarz), so no two runs can differ by
  more than ADAM_BOUND * sum(lr); anything beyond is a bug, whatever the noise.
`test_weight_check_catches_a_broken_layout` shows the checks fail for a layout whose
data-parallel gradient all-reduce is skipped.
"""

import math

import pytest
import torch

from megatron_ext.callbacks import Callback
from tests.forked_ranks import run_on_ranks

COMMON = ["train.steps=3", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=1",
          "data.seq_length=32", "checkpoint.keep_last=0"]
DENSE = COMMON + ["model=qwen3_debug"]
MOE = COMMON + ["model=qwen3_moe_debug", "moe.aux_loss_coeff=1e-2"]

GRAD_NORM_TOL = 1e-4
"""Relative grad-norm difference allowed at step 1 (identical initial weights, rounding only)."""
GRAD_NORM_TOL_LATER = 2e-3
"""... and at later steps, whose weights differ by what Adam made of noise (bounded below)."""
NOISE_FLOOR = 1e-1
"""An element is determined when |grad| >= NOISE_FLOOR * RMS(grad of its tensor) at every step."""
DETERMINED_TOL = 1e-2
"""Determined elements agree within this fraction of the summed learning rates."""
ADAM_BOUND = 2.01
"""No element may differ by more than this many summed learning rates (two Adam walks of <= lr/step)."""


def _skip_grad_all_reduce():
    """A deliberately broken layout: data-parallel ranks never sum their gradients (with
    parallel.overlap_grad_reduce=false, where the whole reduction is finish_grad_sync's)."""
    from megatron.core.distributed import DistributedDataParallel

    DistributedDataParallel.finish_grad_sync = lambda self, *args, **kwargs: None


class _RecordDeterminedElements(Callback):
    """Training callback: before each optimizer step, marks the elements whose gradient is above
    the noise floor at this step and every step before (single process: names are global)."""

    determined = None

    def on_start(self, run):
        rt, step = run.rt, run.rt.optimizer.step

        def recording_step():
            self.record(rt.model[0].module)
            return step()

        rt.optimizer.step = recording_step

    def record(self, module):
        marks = {}
        for name, p in module.named_parameters():
            g = p.main_grad.abs()
            marks[name] = g >= NOISE_FLOOR * g.square().mean().sqrt()
        self.determined = marks if self.determined is None else {k: self.determined[k] & marks[k] for k in marks}


def _train(rank, world_size, overrides, out, record=False, sabotage=None):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    if sabotage is not None:
        sabotage()
    cfg = load_config(overrides + [f"checkpoint.dir={out}"])
    validate(cfg, world_size)
    recorder = _RecordDeterminedElements()
    history = train(cfg, PretrainStage(), [recorder] if record else []).history
    return (history, recorder.determined) if record else history


def _final_weights(rank, world_size, overrides, ckpts):
    from megatron_ext import checkpoint
    from megatron_ext.build import build
    from megatron_ext.cli import load_config

    rt = build(load_config(overrides))
    weights = []
    for ckpt in ckpts:
        checkpoint.load(rt, ckpt, checkpoint.verify(ckpt), load_optimizer=False)
        weights.append({k: v.detach().clone() for k, v in rt.model[0].module.named_parameters()})
    return weights


def compare_weights(name, ref_w, got_w, determined, lr_sum):
    """The two-part weight check of the module docstring; raises AssertionError naming the tensor."""
    assert ref_w.keys() == got_w.keys() == determined.keys()
    for key in ref_w:
        diff = (got_w[key] - ref_w[key]).abs()
        worst = diff.max().item()
        assert worst <= ADAM_BOUND * lr_sum, (
            f"{name}: {key}: an element moved {worst:.3g} away from one process's, more than Adam can "
            f"(<= {ADAM_BOUND} * sum(lr) = {ADAM_BOUND * lr_sum:.3g})")
        mask = determined[key]
        if mask.any():
            worst = diff[mask].max().item()
            assert worst <= DETERMINED_TOL * lr_sum, (
                f"{name}: {key}: an element with a gradient above the noise floor differs by {worst:.3g} "
                f"(allowed {DETERMINED_TOL} * sum(lr) = {DETERMINED_TOL * lr_sum:.3g}; "
                f"{int(mask.sum())} of {mask.numel()} elements determined)")


class Reference:
    """The single-process run of one model, and a way to compare a layout against it."""

    def __init__(self, base, tmp):
        self.base, self.tmp = base, tmp
        self.history, self.determined = run_on_ranks(_train, 1, base, tmp / "ref", True)[0]
        self.lr_sum = sum(h["lr"] for h in self.history)

    def run(self, name, ranks, overrides, sabotage=None):
        """Train the layout; return its per-rank histories and (reference, layout) final weights."""
        out = self.tmp / name
        histories = run_on_ranks(_train, ranks, self.base + overrides, out, False, sabotage)
        ref_w, got_w = run_on_ranks(_final_weights, 1, self.base,
                                    [self.tmp / "ref" / "iter_0000003", out / "iter_0000003"])[0]
        return histories, ref_w, got_w

    def check(self, name, ranks, overrides):
        histories, ref_w, got_w = self.run(name, ranks, overrides)
        for history in histories:
            for step, (ref, got) in enumerate(zip(self.history, history, strict=True), 1):
                assert math.isclose(got["loss"], ref["loss"], rel_tol=1e-5), (name, step, ref, got)
                # Step 1 starts from identical weights: only rounding separates the gradients. Later
                # steps start from weights Adam moved apart where gradients were noise (see above),
                # which moves the grad norm by up to a few 1e-4 of itself.
                rel = GRAD_NORM_TOL if step == 1 else GRAD_NORM_TOL_LATER
                assert math.isclose(got["grad_norm"], ref["grad_norm"], rel_tol=rel), (name, step, ref, got)
        compare_weights(name, ref_w, got_w, self.determined, self.lr_sum)


BASES = {"dense": DENSE, "qwen2_tied": COMMON + ["model=qwen2_debug"], "moe": MOE, "moe_seq_aux": MOE + ["moe.load_balancing=seq_aux_loss"]}

LAYOUTS = {
    # name: (reference model, ranks, overrides)
    "dp2": ("dense", 2, []),
    "dp2_distributed_optimizer": ("dense", 2, ["parallel.distributed_optimizer=true"]),
    "tp2_sp": ("dense", 2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": ("dense", 2, ["parallel.pp=2"]),
    "pp2_vpp2": ("dense", 2, ["parallel.pp=2", "parallel.vpp=2"]),
    "cp2": ("dense", 2, ["parallel.cp=2"]),
    "pp2_uneven_1_3": ("dense", 2, ["parallel.pp=2", "parallel.first_stage_layers=1"]),
    "qwen2_tied_embeddings_pp2": ("qwen2_tied", 2, ["parallel.pp=2"]),
    "tp2_pp2": ("dense", 4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp2_sp_cp2": ("dense", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.cp=2"]),
    "moe_ep2_alltoall": ("moe", 2, ["parallel.ep=2"]),
    "moe_ep2_allgather": ("moe", 2, ["parallel.ep=2", "moe.dispatcher=allgather"]),
    "moe_tp2_sp_ep2_etp1": ("moe", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]),
    "moe_tp2_sp_seq_aux_loss": ("moe_seq_aux", 2, ["parallel.tp=2", "parallel.sp=true"]),
    "moe_ep2_dp2": ("moe", 4, ["parallel.ep=2"]),
    "moe_tp2_sp_ep2_etp2": ("moe", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Reference(BASES[name], tmp_path_factory.mktemp(name))
        return cache[name]

    return get


# Covered by the default suite: every parallelism once, both dispatchers, and three 4-rank mixes.
# These variations run with `-m slow` (make test-all) to keep the default suite short on 2 cores.
SLOW = {"pp2_uneven_1_3", "moe_tp2_sp_seq_aux_loss", "moe_tp2_sp_ep2_etp2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LAYOUTS])
def test_layout_equals_single_process(references, name):
    base, ranks, overrides = LAYOUTS[name]
    references(base).check(name, ranks, overrides)


def test_weight_check_catches_a_broken_layout(references):
    """The checks above can fail: DP=2 with the gradient all-reduce skipped (each rank steps on
    its own half of the batch) is refused by the weight check alone, and by the loss check."""
    ref = references("dense")
    histories, ref_w, got_w = ref.run("dp2_no_grad_all_reduce", 2, ["parallel.overlap_grad_reduce=false"],
                                      sabotage=_skip_grad_all_reduce)
    with pytest.raises(AssertionError, match="gradient above the noise floor differs"):
        compare_weights("dp2_no_grad_all_reduce", ref_w, got_w, ref.determined, ref.lr_sum)
    assert not math.isclose(histories[0][-1]["loss"], ref.history[-1]["loss"], rel_tol=1e-5)


def test_weight_check_bounds():
    """Unit check of compare_weights on made-up tensors: noise within Adam's reach is allowed on
    undetermined elements only; beyond Adam's reach fails everywhere."""
    ref = {"w": torch.zeros(4)}
    determined = {"w": torch.tensor([True, True, False, False])}
    lr_sum = 1e-2
    compare_weights("ok", ref, {"w": torch.tensor([0.0, 5e-5, 0.015, -0.02])}, determined, lr_sum)
    with pytest.raises(AssertionError, match="noise floor"):
        compare_weights("bad", ref, {"w": torch.tensor([0.0, 2e-4, 0.0, 0.0])}, determined, lr_sum)
    with pytest.raises(AssertionError, match="more than Adam can"):
        compare_weights("bad", ref, {"w": torch.tensor([0.0, 0.0, 0.0, 0.03])}, determined, lr_sum)


def _overlapped_run(rank, world_size, overrides):
    """Train; return the history, this rank's final weights, per finish_grad_sync call how many
    gradient bucket groups had their reduction under way already (started in the backward pass)
    and how many there are, and after each optimizer step whether the updated parameters were
    all-gathered (for each bucket group, with the distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    started, gathered = [], []
    finish, step = DistributedDataParallel.finish_grad_sync, DistributedOptimizer.step_with_ready_grads

    def recording_finish(self, *args, **kwargs):
        groups = self.bucket_groups + self.expert_parallel_bucket_groups
        started.append((sum(g.grad_reduce_handle is not None for g in groups), len(groups)))
        return finish(self, *args, **kwargs)

    def recording_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        gathered.append([g.param_gather_dispatched for c in self.model_chunks for g in c.bucket_groups])
        return result

    DistributedDataParallel.finish_grad_sync = recording_finish
    DistributedOptimizer.step_with_ready_grads = recording_step
    cfg = load_config(overrides)
    validate(cfg, world_size)
    result = train(cfg, PretrainStage())
    weights = {k: v.detach().clone() for k, v in result.runtime.model[0].module.named_parameters()}
    return result.history, weights, started, gathered


@pytest.mark.parametrize("layout,bucket_groups", [
    (["parallel.distributed_optimizer=true"], 3),
    # Pipeline schedules start a model chunk's reduction when its last backward pass ends (one
    # bucket per virtual stage).
    (["parallel.pp=2", "parallel.vpp=2", "parallel.distributed_optimizer=true"], 1),
], ids=["dp2_distributed_optimizer", "pp2_vpp2_dp2_distributed_optimizer"])
def test_overlapped_communication_trains_exactly_as_after_the_step(tmp_path, layout, bucket_groups):
    """With parallel.overlap_grad_reduce and overlap_param_gather (small buckets), the gradient
    buckets' reductions start during the last micro-batch's backward pass and the updated
    parameters are gathered in the next forward pass, not in the optimizer step; training is
    bit-identical to communicating after the backward pass and in the step: the same losses,
    evaluation losses, checkpoints and final weights. (Only the grad norm's summation order
    follows the buckets, so it is compared to rounding, and clipping, which would carry that
    rounding into the weights, is off.)"""
    ranks = 2 if len(layout) == 1 else 4
    base = DENSE + ["train.global_batch_size=8", "train.clip_grad=0", "train.eval_interval=2", "train.eval_iters=1",
                    "checkpoint.save_interval=1"] + layout
    overlapped = base + ["parallel.grad_bucket_size=200000", f"checkpoint.dir={tmp_path / 'overlapped'}"]
    after = base + ["parallel.overlap_grad_reduce=false", f"checkpoint.dir={tmp_path / 'after'}"]
    runs = {overlap: run_on_ranks(_overlapped_run, ranks, overlapped if overlap else after)
            for overlap in (True, False)}
    for (history, weights, started, gathered), (ref_history, ref_weights, ref_started, ref_gathered) in \
            zip(runs[True], runs[False]):
        for key in ("loss", "val_loss"):
            assert [h.get(key) for h in history] == [h.get(key) for h in ref_history], key
        assert any("val_loss" in h for h in history)
        assert [h["grad_norm"] for h in history] == pytest.approx([h["grad_norm"] for h in ref_history], rel=1e-5)
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
        assert all(n == 0 for n, _ in ref_started), ref_started
        # From the second step on (in the first, Megatron-Core learns the order in which the
        # buckets fill) every bucket's reduction is under way before the wait.
        later = started[len(started) // 3:]
        assert all(n == total >= bucket_groups for n, total in later), started
        assert len(gathered) == 3 and not any(any(g) for g in gathered), gathered
        assert all(all(g) for g in ref_gathered), ref_gathered
    for step in (1, 2):
        ours, ref = run_on_ranks(_final_weights, 1, DENSE, [tmp_path / run / f"iter_{step:07d}"
                                                            for run in ("overlapped", "after")])[0]
        assert all(torch.equal(ours[k], ref[k]) for k in ref), step
