"""The command line every training entry shares: --help, flags, and unknown keys as errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from megatron_ext import stages
from megatron_ext.cli import CONF_DIR, COMMON_KEYS, check_overrides, load_config, suggest
from megatron_ext.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
@pytest.fixture(autouse=True)
def _no_signal_handlers(monkeypatch):
    """In-process entries must not install the preemption handlers in the test process."""
    monkeypatch.setattr("megatron_ext.fault.preemption_watcher", lambda: None)


def _entry_help(name, argv, capsys):
    """Run an entry in-process as its __main__ would; return (exit code, stdout, stderr)."""
    if name == "pretrain":
        from megatron_ext.train import main

        code = main(argv)
    elif name == "cpt":
        from posttrain.cpt import main

        code = main(argv)
    else:
        from megatron_ext.train import run_stage

        code = run_stage(name, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _value(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name,module,stage", [
    ("pretrain", "megatron_ext.train", "pretrain"), ("cpt", "posttrain.cpt", "cpt_math"),
    ("sft", "posttrain.sft", "sft"), ("rm", "posttrain.rm", "rm"), ("prm", "posttrain.prm", "prm"),
    ("dpo", "posttrain.dpo", "dpo"), ("grpo", "posttrain.grpo", "grpo"),
])
def test_help_of_every_entry(name, module, stage, capsys):
    code, out, _ = _entry_help(name, ["--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: python -m {module} [-h] [--print-config] [key=value ...]"), out[:200]
    for model in (p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
        assert model in out, f"model option {model} missing from the help"
    for precision in (p.stem for p in (CONF_DIR / "precision").glob("*.yaml")):
        assert precision in out
    assert f"{stage} (default)" in out and "qwen3_debug (default)" in out
    # The defaults shown are this entry's (its stage's YAML applied), not the schema's.
    # Each row is a valid override that gives the value this entry really has.
    cfg = load_config([f"stage={stage}"])
    rows = dict(re.findall(r"^  ([a-z_]+\.[a-z_0-9]+)=(\S+)", out, flags=re.M))
    parser = OverridesParser.create()
    for key in COMMON_KEYS + stages.info(stage).help_keys:
        assert key in rows, f"{key} missing from the help"
        (parsed,) = parser.parse_overrides([f"{key}={rows[key]}"])
        assert parsed.value() == _value(cfg, key), (key, rows[key], _value(cfg, key))
    assert "Optimizer steps to run" in out  # the field's docstring
    assert "--print-config" in out and "override_schedule" in out and "did you mean" not in out
    assert _entry_help(name, ["-h"], capsys)[1] == out


def test_help_lists_only_the_stages_an_entry_runs(capsys):
    _, out, _ = _entry_help("cpt", ["-h"], capsys)
    stages = out.split("  stage:\n")[1].split("\n\n")[0]
    assert "cpt_code" in stages and "long_context" in stages and "sft" not in stages
    _, out, _ = _entry_help("sft", ["-h"], capsys)
    assert "sft.packing=false" in out and "dpo.loss" not in out


def test_help_names_the_real_default_stage(capsys):
    # The stage list is sorted (cpt_code first); the default is conf/config.yaml's, not the first.
    _, out, _ = _entry_help("pretrain", ["-h"], capsys)
    first = out.split("\n\n")[1]
    assert "default pretrain)" in first and "default cpt_code" not in first, first
    assert load_config([]).stage == "pretrain"
    _, out, _ = _entry_help("cpt", ["-h"], capsys)
    assert "default cpt_math)" in out.split("\n\n")[1]


def test_help_shows_the_overridden_values(capsys):
    _, out, _ = _entry_help("pretrain", ["-h", "train.steps=77", "model=qwen2_debug"], capsys)
    assert "train.steps=77 " in out and "qwen2_debug (default)" in out
    _, out, _ = _entry_help("pretrain", ["-h", "train.stpes=77"], capsys)
    assert "train.steps=30 " in out and "rejected" in out and "did you mean train.steps" in out


def test_help_and_dash_h_from_the_command_line():
    for flag in ("--help", "-h"):
        proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", flag], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("usage: python -m megatron_ext.train") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "posttrain.dpo", "-h"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "dpo.loss=sigmoid" in proc.stdout, proc.stderr[-2000:]


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _entry_help("pretrain", ["--hepl"], capsys)
    assert e.value.code == 2
    assert "unknown flag(s) ['--hepl']" in capsys.readouterr().err


@pytest.mark.parametrize("override,expected", [
    ("train.stpes=3", "did you mean train.steps?"),
    ("+train.stpes=3", "did you mean train.steps?"),
    ("++train.stpes=3", "did you mean train.steps?"),
    ("trian.steps=3", "did you mean train.steps?"),
    ("lr=1e-3", "did you mean train.lr?"),
    ("train.tp=2", "did you mean parallel.tp?"),
    ("checkpoint.overide_schedule=true", "did you mean checkpoint.override_schedule?"),
    ("model.num_layer=2", "did you mean model.num_layers"),
    ("+foo=1", "unknown config key foo in '+foo=1' ("),
    ("+train.steps=3", "train.steps already exists; set it with train.steps=3 (no +)"),
    ("+model=qwen2_debug", "pick another with model=qwen2_debug (no +)"),
    ("data.weights.0=1", "set the whole list, e.g. data.weights=[...]"),
    ("steps", "cannot parse override 'steps'"),
])
def test_unknown_keys_are_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert expected in str(e.value), str(e.value)


def test_all_bad_overrides_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(["train.stpes=3", "train.steps=4", "+data.seq_lenght=8"])
    assert "train.stpes" in str(e.value) and "data.seq_length" in str(e.value) and "train.steps=4" not in str(e.value)


def test_legitimate_overrides_still_work():
    cfg = load_config(["++train.steps=3", "model=qwen2_debug", "stage=sft", "data.paths=[a,b]",
                       "checkpoint.override_schedule=true"])
    assert (cfg.train.steps, cfg.model.name, cfg.stage, cfg.data.paths) == (3, "qwen2_debug", "sft", ["a", "b"])
    assert cfg.checkpoint.override_schedule is True
    check_overrides(["train.lr=1e-4", "precision=bf16", "logger.tensorboard_dir=null"])


def test_suggestions_come_from_the_schema():
    assert suggest("train.warmup") == ["train.warmup_steps"]
    assert suggest("parallel.distributed_optimiser") == ["parallel.distributed_optimizer"]
    assert suggest("zzz.qqq") == []


def test_print_config_refuses_an_unknown_added_key():
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--print-config", "+foo=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown config key foo" in proc.stderr, (proc.stdout[-500:], proc.stderr[-2000:])
    assert proc.stdout == ""


def test_entry_refuses_a_stage_it_does_not_run(capsys):
    """A posttrain.X entry runs stage X only; megatron_ext.train runs any stage (tests/test_stages.py)."""
    with pytest.raises(SystemExit) as e:
        _entry_help("sft", ["--print-config", "stage=dpo"], capsys)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "stage=dpo is not run by python -m posttrain.sft" in err and "use python -m megatron_ext.train stage=dpo" in err


def test_slurm_launcher_help(capsys):
    import importlib.util

    launch = sys.modules.get("slurm_launch")
    if launch is None:  # slurm/ is a folder of scripts: load launch.py as tests/test_slurm.py does
        spec = importlib.util.spec_from_file_location("slurm_launch", REPO / "slurm" / "launch.py")
        launch = sys.modules["slurm_launch"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(launch)
    with pytest.raises(SystemExit) as e:
        launch.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    from megatron_ext import stages

    assert "python -m megatron_ext.train stage=X" in out
    for stage in stages.names():
        assert f"stage={stage} " in out and stages.stage_class_of(stage) in out
    assert "qwen3_235b_a22b" in out and "fp8_blockwise" in out and "--dry-run" in out
    assert "train.steps=30 " in out and "checkpoint.override_schedule=false" in out
    assert "checkpoint.load=auto" in out and "did you mean" not in out


def test_tool_arguments_are_flags_or_overrides(capsys):
    """The tools that take flags and config overrides (bench_train, bench_generate,
    estimate_memory) refuse anything else by name, `--flag=value` spellings included."""
    import argparse

    from megatron_ext.cli import parse_tool_args

    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, default=1)
    args, overrides = parse_tool_args(parser, ["train.lr=1e-4", "--n", "3", "+moe.aux=0"])
    assert args.n == 3 and overrides == ["train.lr=1e-4", "+moe.aux=0"]
    for bad in (["--bogus=1"], ["typo"], ["-x"]):
        with pytest.raises(SystemExit):
            parse_tool_args(parser, bad)
        assert f"unrecognised argument(s) {bad}" in capsys.readouterr().err
