"""`checkpoint.load` resolved once into a LoadPlan (megatron_ext.checkpoint.plan), and the readers
that use it: config validation, training's resume, the reference model, the Slurm launcher."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_ext.checkpoint import CheckpointError, TrainState
from megatron_ext.checkpoint.paths import CONVERTED_META
from megatron_ext.checkpoint.plan import LoadKind, LoadPlan, parse_load, resolve_load
from megatron_ext.config import CheckpointConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def disk(tmp_path):
    """One directory of each kind (identified by their entries: no file is read)."""
    root = tmp_path / "run"
    for step in (2, 4):
        (root / f"iter_{step:07d}").mkdir(parents=True)
        (root / f"iter_{step:07d}" / "meta.json").write_text("{}")
    (tmp_path / "pointer_only").mkdir()
    (tmp_path / "pointer_only" / "latest").write_text("iter_0000002\n")
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / CONVERTED_META).write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def _c(load, dir=None, weights_only=False):
    return CheckpointConfig(load=load, dir=None if dir is None else str(dir), weights_only=weights_only)


def test_parse_load_reads_the_config_alone(tmp_path):
    assert parse_load(_c(None)) == LoadPlan(LoadKind.FRESH)
    assert parse_load(_c("", weights_only=True)) == LoadPlan(LoadKind.FRESH, weights_only=True)
    assert parse_load(_c("auto", tmp_path)) == LoadPlan(LoadKind.AUTO, "auto", tmp_path)
    # A path is not looked at: it may exist only where the job runs.
    plan = parse_load(_c("/nowhere/sft", tmp_path, weights_only=True))
    assert plan == LoadPlan(LoadKind.PATH, "/nowhere/sft", Path("/nowhere/sft"), True)
    assert plan.start_model == "/nowhere/sft"
    assert parse_load(_c("auto", tmp_path)).start_model is None and parse_load(_c(None)).start_model is None
    with pytest.raises(CheckpointError, match=r"^checkpoint.load=auto needs checkpoint.dir$"):
        parse_load(_c("auto"))


@pytest.mark.parametrize("load, weights_only, kind, path", [
    (None, False, LoadKind.FRESH, None),
    ("auto", True, LoadKind.AUTO, "{dir}"),
    ("{disk}/run", False, LoadKind.ROOT, "{disk}/run"),
    ("{disk}/run/", True, LoadKind.ROOT, "{disk}/run"),
    ("{disk}/pointer_only", False, LoadKind.ROOT, "{disk}/pointer_only"),
    ("{disk}/run/iter_0000002", False, LoadKind.TRAINING, "{disk}/run/iter_0000002"),
    ("{disk}/run/iter_0000004", True, LoadKind.TRAINING, "{disk}/run/iter_0000004"),
    ("{disk}/converted", True, LoadKind.CONVERTED, "{disk}/converted"),
])
def test_every_kind_of_load_resolves_to_its_plan(disk, load, weights_only, kind, path):
    own = disk / "own"
    fill = lambda s: s and s.format(disk=disk, dir=own)  # noqa: E731
    plan = resolve_load(_c(fill(load), own, weights_only))
    assert plan == LoadPlan(kind, fill(load), Path(fill(path)) if path else None, weights_only)
    assert plan.start_model == (fill(load) if kind not in (LoadKind.FRESH, LoadKind.AUTO) else None)


@pytest.mark.parametrize("load, dir, weights_only, message", [
    ("auto", None, False, r"^checkpoint.load=auto needs checkpoint.dir$"),
    ("{disk}/missing", None, False, r"^checkpoint.load={disk}/missing: no such directory$"),
    ("{disk}/a_file", None, True, r"^checkpoint.load={disk}/a_file: no such directory$"),
    ("{disk}/empty", None, False, r"^{disk}/empty is not a checkpoint: no qwen_checkpoint.json \(tools.convert\), "
                                  r"no meta.json .* no iter_N directories or `latest` \(training root\)$"),
    ("{disk}/converted", "{disk}/run", False, r"^checkpoint.load={disk}/converted is a converted model "
                                              r"\(weights only\): set checkpoint.weights_only=true$"),
])
def test_each_bad_load_gives_its_named_error(disk, load, dir, weights_only, message):
    fill = lambda s: s and s.format(disk=disk)  # noqa: E731
    with pytest.raises(CheckpointError, match=message.format(disk=disk)):
        resolve_load(_c(fill(load), fill(dir), weights_only))


def test_resume_follows_the_plan_without_a_checkpoint_to_read(disk):
    """The plans that load nothing, and the refusals before any weights are read (no process
    group needed: none of them gets as far as a collective)."""
    from megatron_ext.checkpoint import resume

    def run(**checkpoint):
        return resume(SimpleNamespace(config=SimpleNamespace(checkpoint=_c(**checkpoint), model=None)))

    assert run(load=None) == TrainState()
    assert run(load="auto", dir=disk / "not_yet_created") == TrainState()  # the first run of a job
    with pytest.raises(CheckpointError, match="pointer_only: no complete, uncorrupted checkpoint there"):
        run(load=str(disk / "pointer_only"))
    with pytest.raises(CheckpointError, match="set checkpoint.weights_only=true"):
        run(load=str(disk / "converted"))
    with pytest.raises(CheckpointError, match="no such directory"):
        run(load=str(disk / "missing"), weights_only=True)


def test_config_validation_checks_the_value_but_not_the_directory(tmp_path):
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError, validate

    with pytest.raises(ConfigError, match="checkpoint.load=auto needs checkpoint.dir"):
        validate(load_config(["checkpoint.load=auto"]), 1, check_device=False)
    validate(load_config([f"checkpoint.load={tmp_path}/made_later"]), 1, check_device=False)
    validate(load_config(["checkpoint.load=auto", f"checkpoint.dir={tmp_path}"]), 1, check_device=False)


@pytest.mark.parametrize("overrides, expected", [
    ([], None),
    (["checkpoint.load=auto", "checkpoint.dir={tmp}"], None),
    (["checkpoint.load={tmp}/sft"], "{tmp}/sft"),
    (["checkpoint.load={tmp}/sft", "posttrain.ref_load={tmp}/base"], "{tmp}/base"),
    (["posttrain.ref_load={tmp}/base"], "{tmp}/base"),
])
def test_reference_model_defaults_to_the_start_model(tmp_path, overrides, expected):
    from megatron_ext.cli import load_config
    from posttrain.reference import Reference

    cfg = load_config([o.format(tmp=tmp_path) for o in ["stage=dpo", *overrides]])
    assert Reference(cfg).source() == (expected and expected.format(tmp=tmp_path))


def test_launcher_reads_a_null_load_as_a_fresh_start(tmp_path):
    from tests.test_slurm import launch

    own = f"checkpoint.dir={tmp_path}"
    out, _ = launch.with_checkpoint_overrides([own, "checkpoint.load=null"], "job")
    assert out == [own, "checkpoint.load=null", "checkpoint.load=auto"]
    out, _ = launch.with_checkpoint_overrides([own, "checkpoint.load=auto", "stage=dpo"], "job")
    assert out == [own, "checkpoint.load=auto", "stage=dpo"]  # no reference pinned to `auto`


def test_planning_a_load_does_not_import_megatron_core():
    code = ("import sys; from megatron_ext.checkpoint.plan import parse_load; import megatron_ext.checkpoint as c; "
            "c.LoadPlan; c.complete_checkpoints; print('megatron.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_re_exported_name_resolves():
    import megatron_ext.checkpoint as checkpoint
    from megatron_ext.checkpoint import resuming, sources, store

    assert checkpoint.resume is resuming.resume and checkpoint.load is resuming.load
    assert checkpoint.Source is sources.Source and checkpoint.TrainState is store.TrainState
    for name in checkpoint.__all__:
        assert getattr(checkpoint, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        checkpoint.nope
