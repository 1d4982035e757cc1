"""The stage registry: one way from stage=X to the class that trains it, for every entry."""

import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_ext import stages
from megatron_ext.cli import load_config
from megatron_ext.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", stages.names())
def test_every_stage_config_names_a_class_that_builds_from_its_config(name):
    cfg = load_config([f"stage={name}"])
    assert cfg.stage == name and cfg.stage_class == stages.stage_class_of(name)
    stage = stages.make(cfg)
    assert callable(stage.forward_step) and callable(stage.datasets)


def test_registry_finds_the_stages_and_their_reference_models():
    assert {"pretrain", "cpt_math", "long_context", "sft", "rm", "prm", "dpo", "grpo"} <= set(stages.names())
    assert [n for n in stages.names() if stages.uses_reference_model(n)] == ["dpo", "grpo"]


def test_only_stages_declaring_it_run_as_a_cuda_graph():
    """train.cuda_graph: the pretraining and CPT stages declare their step capturable; the
    post-training stages (variable shapes, rollouts, host-side metrics) are refused by name."""
    safe = []
    for name in stages.names():
        cfg = load_config([f"stage={name}"])
        cfg.train.cuda_graph = True
        try:
            stages.make(cfg)
            safe.append(name)
        except ConfigError as e:
            assert f"stage_class={cfg.stage_class} does not declare" in str(e), (name, e)
    assert safe == ["cpt_code", "cpt_math", "long_context", "pretrain"], safe


def test_bad_stage_class_is_named():
    cfg = load_config([])
    cfg.stage_class = "posttrain.dpo:NoSuchStage"
    with pytest.raises(ConfigError, match="stage_class='posttrain.dpo:NoSuchStage': posttrain.dpo has no NoSuchStage"):
        stages.make(cfg)
    cfg.stage_class = "posttrain.dpo"
    with pytest.raises(ConfigError, match="not of the form module:Class"):
        stages.make(cfg)


def test_train_entry_dispatches_the_stage():
    """`python -m megatron_ext.train stage=dpo` trains DPO (its loss at initialisation is ln 2),
    not the pretraining loss on DPO's settings."""
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", "stage=dpo", "train.steps=1",
                           "train.global_batch_size=4", "posttrain.num_samples=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: dpo loss 0.6931" in proc.stderr, proc.stderr[-3000:]


def test_stage_rules_refuse_before_training():
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", "stage=grpo", "grpo.group_size=3",
                           "train.micro_batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "grpo.group_size=3" in proc.stderr, proc.stderr[-2000:]


@dataclass
class _ToyOptions:
    alpha: float = 1.0
    """A toy stage's own key."""


class _ToyStage:
    """A stage defined outside the project: its section comes with it, nothing else changes."""

    config_section, config_options = "toy", _ToyOptions

    def __init__(self, cfg):
        if cfg.toy.alpha <= 0:
            raise ConfigError(f"toy.alpha={cfg.toy.alpha} must be positive")
        self.cfg = cfg


def test_a_stage_brings_its_own_config_section():
    spec = f"{__name__}:_ToyStage"
    cfg = load_config([f"stage_class={spec}", "toy.alpha=2.5"])
    assert cfg.toy.alpha == 2.5 and stages.make(cfg).cfg is cfg
    with pytest.raises(ConfigError, match="toy.alpha=-1.0 must be positive"):
        stages.make(load_config([f"stage_class={spec}", "toy.alpha=-1"]))
    with pytest.raises(ConfigError, match="did you mean toy.alpha"):
        load_config([f"stage_class={spec}", "toy.alpah=1"])
    with pytest.raises(ConfigError, match="toy.alpha"):
        load_config([f"stage_class={spec}", "toy.alpha=abc"])  # typed like every key


def test_only_the_chosen_stage_section_is_in_the_job():
    dpo = load_config(["stage=dpo", "dpo.beta=0.3", "dpo.loss=ipo"])
    assert (dpo.dpo.beta, dpo.dpo.loss) == (0.3, "ipo") and not hasattr(dpo, "grpo")
    assert pickle.loads(pickle.dumps(dpo)).dpo.beta == 0.3  # configs cross process boundaries
    assert load_config(["stage=grpo"]).grpo.group_size == 8  # conf/stage/grpo.yaml's default
    assert not hasattr(load_config([]), "dpo")
    with pytest.raises(ConfigError, match="grpo.kl_coef in 'grpo.kl_coef=0': grpo.. is the section of stage=grpo"):
        load_config(["stage=dpo", "grpo.kl_coef=0"])
    with pytest.raises(ConfigError, match="posttrain.beta in 'posttrain.beta=0.2': it is now dpo.beta"):
        load_config(["stage=dpo", "posttrain.beta=0.2"])


def test_in_training_evaluation_hook_is_named_by_the_config():
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", "eval.train_tasks=[math_synth]",
                           "train.eval_interval=1", "eval.train_hook=posttrain.evals.runner:no_such_hook"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval.train_hook='posttrain.evals.runner:no_such_hook': posttrain.evals.runner has no no_such_hook" \
        in proc.stderr, proc.stderr[-2000:]


def test_stage_reports_stay_on_the_device_of_the_loss():
    """A post-training loss_func's report is summed where it was computed (one host copy per step in
    loop.reduce_reports), not copied to the host per micro-batch: on the meta device any host copy
    would raise."""
    from posttrain.common import report

    loss = torch.ones(4, device="meta").sum()
    rep = report({"lm loss": (loss, 4), "tokens": (loss, torch.ones(3, device="meta").sum().to(torch.int))})
    assert {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in rep.items()} == {
        "lm loss": ("meta", torch.float32, (2,)), "tokens": ("meta", torch.float32, (2,))}
    cpu = report({"lm loss": (torch.tensor(6.0), 3)})["lm loss"]
    assert cpu.tolist() == [6.0, 3.0]
