"""Megatron-Core's dataset index cache is read without pickle, and lives where the run writes.

Each attack plants a file whose unpickling would create a marker file; the marker must never
appear, and the run must stop with an error naming the planted file."""

import os
from pathlib import Path

import numpy as np
import pytest

from tests.forked_ranks import run_on_ranks

SHORT = ["train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2", "data.seq_length=32"]


def _payload(marker: Path) -> bytes:
    """Pickle bytes (protocol 0, written by hand) that call os.system('touch MARKER') when loaded."""
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def _object_npy(path: Path) -> None:
    """A real .npy file holding an object array (numpy pickles its elements)."""
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("module", ["gpt_dataset", "blended_dataset", "masked_dataset"])
@pytest.mark.parametrize("attack", ["pickle_file", "object_npy", "float_npy"])
def test_megatron_dataset_modules_never_unpickle_an_index(tmp_path, module, attack):
    import importlib

    from megatron_ext import patches

    patches.apply()
    numpy_there = importlib.import_module(f"megatron.core.datasets.{module}").numpy
    marker, planted = tmp_path / "marker", tmp_path / "planted-shuffle_index.npy"
    if attack == "pickle_file":
        planted.write_bytes(_payload(marker))
    elif attack == "object_npy":
        _object_npy(planted)
    else:
        np.save(planted, np.zeros(3, dtype=np.float32))
    with pytest.raises(patches.IndexCacheError, match=str(planted)):
        numpy_there.load(str(planted), allow_pickle=True, mmap_mode="r")  # as Megatron-Core calls it
    assert not marker.exists()
    # The sanity check of the attack: plain numpy with Megatron's arguments does run it.
    if attack == "pickle_file":
        np.load(str(planted), allow_pickle=True, mmap_mode="r")
        assert marker.exists()


def test_integer_indices_load_memory_mapped(tmp_path):
    from megatron_ext import patches

    patches.apply()
    from megatron.core.datasets import gpt_dataset

    for dtype in (np.int16, np.int32, np.int64, np.uint32):
        path = tmp_path / f"index_{np.dtype(dtype).name}.npy"
        np.save(path, np.arange(7, dtype=dtype))
        loaded = gpt_dataset.numpy.load(str(path), allow_pickle=True, mmap_mode="r")
        assert isinstance(loaded, np.memmap) and loaded.dtype == dtype and loaded.tolist() == list(range(7))
    assert gpt_dataset.numpy.concatenate is np.concatenate  # the other names are numpy's own


def _build_twice(rank, world_size, overrides, marker):
    """Build the datasets (writes the index cache), plant a payload over the shuffle index, build
    again: the second build must refuse the planted file."""
    from megatron_ext import data
    from megatron_ext.build import init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.config import ConfigError, validate

    cfg = load_config(overrides)
    validate(cfg, world_size)
    init_parallel(cfg)
    train_ds, _ = data.build_datasets(cfg, 8, 0)
    first = [train_ds[i]["tokens"].tolist() for i in range(2)]
    index_dir = data.cache_dir(cfg) / "index_cache"
    shuffles = sorted(index_dir.glob("*-shuffle_index.npy"))
    assert shuffles, sorted(p.name for p in index_dir.iterdir())
    shuffles[0].write_bytes(_payload(Path(marker)))
    try:
        data.build_datasets(cfg, 8, 0)
    except ConfigError as e:
        return first, str(e), str(shuffles[0])
    return first, None, str(shuffles[0])


def test_a_planted_shuffle_index_stops_the_run_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    overrides = SHORT + [f"data.cache_dir={tmp_path}/cache"]
    (first, error, planted), = run_on_ranks(_build_twice, 1, overrides, str(marker))
    assert len(first) == 2 and all(len(t) == 32 for t in first)
    assert error is not None and error.startswith("data.cache_dir: ") and planted in error and "delete it" in error
    assert not marker.exists()


def test_default_cache_dir_is_where_the_run_writes(tmp_path, monkeypatch):
    from megatron_ext.cli import load_config
    from megatron_ext.data import cache_dir

    monkeypatch.chdir(tmp_path)  # the working directory is never the default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(load_config([f"checkpoint.dir={tmp_path}/run"])) == tmp_path / "run" / "cache"
    assert cache_dir(load_config([])) == tmp_path / "xdg" / "qwen_megatron" / "data"
    assert cache_dir(load_config([f"data.cache_dir={tmp_path}/mine"])) == tmp_path / "mine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir(load_config([])) == Path(os.path.expanduser("~")) / ".cache" / "qwen_megatron" / "data"
