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
from megatron_ext.callbacks import Callback
from megatron_ext.pretrain import PretrainStage
from megatron_ext.stages import LOSS, Stage

REPO = Path(__file__).resolve().parent.parent


# The data a stage's YAML leaves to the user (`data.paths: ???`), where its rules need it.
_PATHS = {"cpt_math": ["data.paths=[a,b,c]"], "cpt_code": ["data.paths=[a,b,c,d]"]}


@pytest.mark.parametrize("name", stages.names())
def test_every_stage_config_names_a_class_that_builds_from_its_config(name):
    cfg = load_config([f"stage={name}", *_PATHS.get(name, [])])
    assert cfg.stage == name and cfg.stage_class == stages.stage_class_of(name)
    stage = stages.make(cfg)
    assert callable(stage.forward_step) and callable(stage.datasets)


def test_the_table_lists_every_stage_with_its_entry_reference_model_and_section():
    rows = {row.name: row for row in stages.table()}
    assert {"pretrain", "cpt_math", "long_context", "sft", "rm", "prm", "dpo", "grpo"} <= set(rows)
    assert [n for n, row in rows.items() if row.uses_reference_model] == ["dpo", "grpo"]
    assert {n: row.entry for n, row in rows.items()} == {
        "pretrain": "megatron_ext.train", "cpt_math": "posttrain.cpt", "cpt_code": "posttrain.cpt",
        "long_context": "posttrain.cpt", "sft": "posttrain.sft", "rm": "posttrain.rm", "prm": "posttrain.prm",
        "dpo": "posttrain.dpo", "grpo": "posttrain.grpo", "eval": "tools.eval"}
    assert {n: row.config_section for n, row in rows.items() if row.config_section} == {
        "cpt_math": "cpt", "cpt_code": "cpt", "long_context": "cpt", "sft": "sft", "dpo": "dpo", "grpo": "grpo"}
    assert [n for n, row in rows.items() if not row.trains] == ["eval"]


def test_a_stage_class_must_be_a_stage():
    cfg = load_config([])
    cfg.stage_class = "megatron_ext.config:Config"
    with pytest.raises(ConfigError, match="is not a subclass of megatron_ext.stages.Stage"):
        stages.make(cfg)


def test_only_stages_declaring_it_run_as_a_cuda_graph():
    """train.cuda_graph: the pretraining and CPT stages declare their step capturable; the
    post-training stages (variable shapes, rollouts, host-side metrics) are refused by name, and
    the long-context stage by its packed documents (cpt.document_mask: lengths vary per batch)."""
    safe = []
    for name in stages.names():
        cfg = load_config([f"stage={name}", *_PATHS.get(name, [])])
        cfg.train.cuda_graph = True
        try:
            stages.make(cfg)
            safe.append(name)
        except ConfigError as e:
            why = "cpt.document_mask=false (got True)" if name == "long_context" else \
                f"stage_class={cfg.stage_class} does not declare"
            assert why in str(e), (name, e)
    assert safe == ["cpt_code", "cpt_math", "pretrain"], safe


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


class _ToyStage(Stage):
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
    from megatron_ext.schedule import report

    loss = torch.ones(4, device="meta").sum()
    rep = report({LOSS: (loss, 4), "tokens": (loss, torch.ones(3, device="meta").sum().to(torch.int))})
    assert {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in rep.items()} == {
        LOSS: ("meta", torch.float32, (2,)), "tokens": ("meta", torch.float32, (2,))}
    cpu = report({LOSS: (torch.tensor(6.0), 3)})[LOSS]
    assert cpu.tolist() == [6.0, 3.0]


@dataclass
class _HookedOptions:
    scale: float = 2.0
    """The factor of the derived metric."""


class _Calls(Callback):
    """A callback that counts what the loop called."""

    def __init__(self):
        self.seen = []

    def on_start(self, run):
        self.seen.append(("start", run.state.step))

    def before_step(self, run):
        self.seen.append(("before", run.state.step))

    def after_step(self, run, record):
        self.seen.append(("after", run.state.step, sorted(record)))

    def on_end(self, run):
        self.seen.append(("end", run.state.step))

    def close(self, run):
        self.seen.append(("close", run.state.step))


class _HookedStage(PretrainStage):
    """A stage defined outside the project with one hook of each kind."""

    loss_name = "hooked_loss"
    config_section, config_options = "hooked", _HookedOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.customized, self.steps_seen, self.calls = 0, [], _Calls()

    def customize_model(self, chunk, cfg):
        self.customized += 1
        chunk.hooked = True

    def before_step(self, rt, state):
        assert all(getattr(chunk.module, "hooked", False) for chunk in rt.model)
        self.steps_seen.append(state.step)

    def forward_step(self, data_iterator, model):
        output, loss_func = super().forward_step(data_iterator, model)

        def with_tokens(out):
            loss, count, reports = loss_func(out)
            return loss, count, {**reports, "tokens": torch.stack([count.float(), torch.ones(())])}

        return output, with_tokens

    def derive_metrics(self, metrics):
        return {**metrics, "scaled_tokens": self.cfg.hooked.scale * metrics["tokens"]}

    def callbacks(self, cfg):
        return [self.calls]


def _run_hooked(rank, world_size, metrics_file):
    from megatron_ext.config import validate
    from megatron_ext.loop import train

    cfg = load_config([f"stage_class={__name__}:_HookedStage", "hooked.scale=3", "train.steps=2",
                       "train.global_batch_size=2", "train.micro_batch_size=1", "data.seq_length=16",
                       f"logger.metrics_file={metrics_file}"])
    validate(cfg, world_size)
    stage = stages.make(cfg)
    history = train(cfg, stage).history
    return stage.customized, stage.steps_seen, stage.calls.seen, history


def test_a_stage_from_outside_the_project_runs_every_hook(tmp_path):
    import json

    from tests.forked_ranks import run_on_ranks

    metrics = tmp_path / "metrics.jsonl"
    ((customized, steps_seen, calls, history),) = run_on_ranks(_run_hooked, 1, str(metrics))
    assert customized == 1 and steps_seen == [0, 1]
    record = ["grad_norm", "loss", "lr", "scaled_tokens", "tokens", "tokens_per_s"]
    assert calls == [("start", 0), ("before", 0), ("after", 1, record), ("before", 1), ("after", 2, record),
                     ("end", 2), ("close", 2)]
    assert [h["scaled_tokens"] for h in history] == [3 * h["tokens"] for h in history] == [48.0, 48.0]
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and "hooked_loss" in logged[0] and "loss" not in logged[0]
    assert logged[0]["hooked_loss"] == history[0]["loss"] and logged[1]["scaled_tokens"] == 48.0
