"""The stage registry: one way from stage=X to the class that trains it, for every entry."""

import subprocess
import sys
from pathlib import Path

import pytest

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
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", "stage=grpo", "posttrain.group_size=3",
                           "train.micro_batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "posttrain.group_size=3" in proc.stderr, proc.stderr[-2000:]
