"""Config composition and cross-field validation: bad input fails before any process group."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext import stages
from megatron_ext.cli import CONF_DIR, load_config
from megatron_ext.config import ConfigError, validate

REPO = Path(__file__).resolve().parent.parent


def _rejects(overrides, world_size, *fragments):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"


def test_defaults_are_valid_on_one_process():
    cfg = load_config([])
    validate(cfg, 1)
    assert cfg.model.name == "qwen3_debug" and cfg.model.qk_norm and not cfg.model.qkv_bias
    assert cfg.precision.name == "fp32"


@pytest.mark.parametrize("path", sorted((CONF_DIR / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_named_model_composes_and_validates(path):
    cfg = load_config([f"model={path.stem}"])
    validate(cfg, 1)
    assert cfg.model.name == path.stem


def test_overrides_apply():
    cfg = load_config(["train.steps=20", "parallel.tp=2", "data.seq_length=64"])
    assert (cfg.train.steps, cfg.parallel.tp, cfg.data.seq_length) == (20, 2, 64)


def test_tp_not_dividing_heads():
    _rejects(["parallel.tp=3"], 3, "model.num_attention_heads=4", "parallel.tp=3")


def test_world_size_mismatch():
    _rejects(["parallel.tp=2"], 1, "world size 1", "tp*pp*cp")
    _rejects(["parallel.tp=2", "parallel.pp=2"], 6, "world size 6")


def test_global_batch_not_divisible():
    _rejects(["train.global_batch_size=6", "train.micro_batch_size=4"], 1,
             "train.global_batch_size=6", "train.micro_batch_size*dp")
    # DP=2 halves the per-rank share: 6 = 2 * 2 * 1.5 does not divide.
    _rejects(["train.global_batch_size=6", "train.micro_batch_size=2"], 2, "micro_batch_size*dp = 2*2")


def test_layer_and_layout_rules():
    _rejects(["parallel.pp=3"], 3, "model.num_layers=4", "parallel.pp*vpp")
    _rejects(["parallel.pp=2", "parallel.first_stage_layers=3", "parallel.last_stage_layers=2"], 2,
             "leaves -1 layers for 0 other stage(s)")
    _rejects(["parallel.pp=3", "parallel.first_stage_layers=1"], 3, "leaves 3 layers for 2 other stage(s)")
    _rejects(["parallel.sp=true"], 1, "parallel.sp=true needs parallel.tp > 1")
    _rejects(["parallel.ep=2"], 2, "parallel.ep=2 needs a MoE model")
    _rejects(["model=qwen3_moe_debug", "parallel.ep=3"], 3, "model.num_experts=4", "parallel.ep=3")
    _rejects(["parallel.cp=2", "data.seq_length=126"], 2, "data.seq_length=126", "2*parallel.cp=4")
    _rejects(["model=qwen3_moe_debug", "parallel.tp=2"], 2, "MoE with parallel.tp=2 needs parallel.sp=true")
    _rejects(["parallel.grad_bucket_size=1000000", "parallel.overlap_grad_reduce=false"], 2,
             "parallel.grad_bucket_size=1000000 needs parallel.overlap_grad_reduce=true (got False)")
    _rejects(["parallel.grad_bucket_size=0"], 2, "parallel.grad_bucket_size=0", "a positive size")


def test_value_rules():
    _rejects(["precision=fp32", "precision.name=fp16"], 1, "precision.name='fp16'")
    _rejects(["train.lr_schedule=wsd"], 1, "train.wsd_decay_steps")
    _rejects(["train.min_lr=1.0"], 1, "train.min_lr")
    _rejects(["model.num_query_groups=3"], 1, "model.num_query_groups=3")


def _rejects_planned(overrides, world_size, *fragments):
    """As _rejects, with the device checks off (a GPU job planned on any machine)."""
    with pytest.raises(ConfigError) as e:
        validate(load_config(overrides), world_size, check_device=False)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"


def test_cuda_graph_rules():
    validate(load_config(["train.cuda_graph=true"]), 1, check_device=False)
    validate(load_config(["train.cuda_graph=true", "stage_class=posttrain.cpt:CPTStage", "precision=bf16"]), 2,
             check_device=False)
    graph = ["train.cuda_graph=true"]
    _rejects_planned(graph + ["parallel.tp=2"], 2, "train.cuda_graph=true needs", "(got 2/1/1/1)")
    _rejects_planned(graph + ["model=qwen3_moe_debug"], 1, "a dense model (model.num_experts=4)")
    with pytest.raises(ConfigError, match=r"cpt.document_mask=false \(got True\)"):
        stages.make(load_config(graph + ["stage=long_context", "data.paths=[x]", "parallel.cp=1"]))
    _rejects_planned(graph + ["train.cuda_graph_warmup_steps=0"], 1, "train.cuda_graph_warmup_steps=0")
    if not torch.cuda.is_available():
        _rejects(graph, 1, "train.cuda_graph=true captures CUDA graphs, but no CUDA GPU is visible")


def test_cuda_graph_sets_megatrons_full_iteration_scope():
    from megatron.core.transformer.enums import CudaGraphScope

    from megatron_ext.transformer import transformer_config

    graphed = transformer_config(load_config(["train.cuda_graph=true", "train.cuda_graph_warmup_steps=3"]))
    assert (graphed.cuda_graph_impl, graphed.cuda_graph_scope, graphed.cuda_graph_warmup_steps) == (
        "local", [CudaGraphScope.full_iteration], 3)
    assert transformer_config(load_config([])).cuda_graph_impl == "none"


def test_several_errors_reported_together():
    cfg = load_config(["train.steps=0", "train.micro_batch_size=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert "train.steps=0" in str(e.value) and "train.micro_batch_size=0" in str(e.value)


@pytest.mark.parametrize("override,fragment", [
    ("train.nope=1", "nope"),
    ("model=no_such_model", "no_such_model"),
    ("train.steps=abc", "train.steps"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert fragment in str(e.value)


def test_cli_rejects_before_process_group_even_with_python_O():
    """The entry point exits 2 with the message; -O must not disable the checks."""
    proc = subprocess.run(
        [sys.executable, "-O", "-m", "megatron_ext.train", "parallel.tp=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.num_attention_heads=4 is not divisible by parallel.tp=3" in proc.stderr
    assert "process group" not in proc.stderr


def test_cli_print_config():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext.train", "--print-config", "train.steps=7"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "steps: 7" in proc.stdout and "name: qwen3_debug" in proc.stdout


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear", "constant"])
def test_lr_schedule_warmup_then_decay(schedule):
    import torch

    from megatron_ext.build import lr_scheduler

    overrides = ["train.steps=20", "train.warmup_steps=4", "train.lr=1.0", "train.min_lr=0.1",
                 f"train.lr_schedule={schedule}", "train.wsd_decay_steps=6"]
    cfg = load_config(overrides)
    validate(cfg, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = lr_scheduler(opt, cfg.train)
    lrs = []
    for _ in range(cfg.train.steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # no step at lr=0
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([1.0] * 16)
        return
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    if schedule == "wsd":  # stable until the last 6 steps, then decays
        assert lrs[4:14] == pytest.approx([1.0] * 10) and lrs[14] < 1.0
