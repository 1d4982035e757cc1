"""Lists of shards: unweighted `data.paths` repeat like weighted ones (weights from token counts),
and `data.blend_file` names a blend in a file or a directory."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.indexed import IndexedReader, IndexedWriter

EOD = 151643
SEQ = 16


def _shard(prefix, base: int, n_docs: int, doc_len: int) -> str:
    """A shard whose tokens all lie in [base, base + 1000): a sample's shard is visible in its tokens."""
    rng = np.random.default_rng(base)
    writer = IndexedWriter(prefix, 151936)
    docs = np.concatenate([np.append(rng.integers(base, base + 1000, size=doc_len), EOD) for _ in range(n_docs)])
    writer.add_packed(docs.astype(np.uint32).tobytes(), np.full(n_docs, doc_len + 1))
    writer.commit()
    return str(prefix)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return d, _shard(d / "a", 1000, 40, 10), _shard(d / "b", 2000, 60, 20)


@pytest.fixture(scope="module", autouse=True)
def one_process_group(tmp_path_factory):
    """Megatron-Core's dataset builder asks for the rank: a one-process gloo group for the
    tests that build datasets in this process (the training test runs in its own)."""
    import torch

    if torch.distributed.is_initialized():
        yield
        return
    init = tmp_path_factory.mktemp("pg") / "init"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _cfg(tmp_path, **data):
    from megatron_ext.config import Config

    cfg = Config()
    cfg.data.seq_length, cfg.data.cache_dir = SEQ, str(tmp_path / "cache")
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _train_set(cfg, samples: int):
    from megatron_ext import data

    data.check_paths(cfg)
    train, _ = data.build_datasets(cfg, samples, 0)
    return train


def _source(sample) -> int:
    """Which shard a sample starts in (0: a, 1: b)."""
    first = next(int(t) for t in sample["tokens"] if t != EOD)
    return first // 1000 - 1


def test_unweighted_shards_sample_by_token_count(shards, tmp_path):
    """More samples than one pass holds; each shard's share is its share of the tokens."""
    _, a, b = shards
    ta, tb = IndexedReader(a).num_tokens, IndexedReader(b).num_tokens
    one_epoch = (ta + tb) // SEQ
    n = 40 * one_epoch
    train = _train_set(_cfg(tmp_path, paths=[a, b]), n)
    assert len(train) >= n  # Megatron-Core rounds each shard's share up
    counts = np.bincount(np.asarray(train.dataset_index), minlength=2)
    assert counts[1] / n == pytest.approx(tb / (ta + tb), abs=0.005)
    picks = [0, one_epoch - 1, one_epoch, n // 2, n - 1]
    assert [_source(train[i]) for i in picks] == [int(train.dataset_index[i]) for i in picks]


def test_single_path_repeats(shards, tmp_path):
    _, a, _ = shards
    n = 10 * IndexedReader(a).num_tokens // SEQ
    train = _train_set(_cfg(tmp_path, paths=[a]), n)
    assert len(train) >= n and _source(train[n - 1]) == 0


def _tokens(train, n: int = 64):
    return [train[i]["tokens"].tolist() for i in range(n)]


def test_blend_file_equals_paths_and_weights(shards, tmp_path):
    from megatron_ext.checkpoint import data_fingerprint

    d, a, b = shards
    pairs = d / "blend.txt"
    pairs.write_text("# weight prefix, relative to this file\n0.3 a\n0.7\nb  # split over lines\n")
    explicit = _train_set(_cfg(tmp_path, paths=[a, b], weights=[0.3, 0.7]), 500)
    cfg = _cfg(tmp_path, blend_file=str(pairs))
    from_file = _train_set(cfg, 500)
    assert _tokens(from_file) == _tokens(explicit)
    assert (cfg.data.paths, cfg.data.weights, cfg.data.blend_file) == ([a, b], [0.3, 0.7], None)
    # The resume check sees the blend: another blend file changes the fingerprint.
    other = d / "other.txt"
    other.write_text("0.5 a 0.5 b\n")
    cfg2 = _cfg(tmp_path, blend_file=str(other))
    _train_set(cfg2, 10)
    assert data_fingerprint(cfg2) != data_fingerprint(cfg)
    assert data_fingerprint(cfg2)["data.paths"] == [a, b]

    unweighted = _tokens(_train_set(_cfg(tmp_path, paths=[a, b]), 500))
    only_prefixes = d / "prefixes.txt"
    only_prefixes.write_text(f"a\n{b}\n")  # relative and absolute
    assert _tokens(_train_set(_cfg(tmp_path, blend_file=str(only_prefixes)), 500)) == unweighted
    shard_dir = tmp_path / "dir"
    shard_dir.mkdir()
    for name in ("a", "b"):
        for ext in ("bin", "idx"):
            (shard_dir / f"{name}.{ext}").write_bytes((d / f"{name}.{ext}").read_bytes())
    assert _tokens(_train_set(_cfg(tmp_path, blend_file=str(shard_dir)), 500)) == unweighted


BAD_FILES = [  # (content, line named, message fragment)
    ("0.5 a\n0.5 missing\n", 2, "missing.bin does not exist"),
    ("0.5 a\nx b\n", 2, "expected a weight, got 'x'"),
    ("0.5 a\n-1 b\n", 2, "weight -1 must be a positive number"),
    ("0 a\n1 b\n", 1, "weight 0 must be a positive number"),
    ("0.5 a\n0.5 b\n0.2\n", 3, "weight 0.2 has no prefix"),
    ("0.5 a\n0.5 0.5\n", 2, "expected a prefix after weight 0.5"),
    ("a\n0.5 b\n", 2, "looks like a weight"),
    ("1 a.bin\n", 1, "prefixes without .bin/.idx"),
    ("# nothing\n\n", None, "is empty"),
]


@pytest.mark.parametrize("content,line,fragment", BAD_FILES)
def test_bad_blend_file_names_file_and_line(shards, content, line, fragment):
    from megatron_ext.config import ConfigError
    from megatron_ext.data import check_paths

    d, _, _ = shards
    path = d / "bad.txt"
    path.write_text(content)
    cfg = _cfg(d, blend_file=str(path))
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert fragment in str(e.value)
    if line is not None:
        assert f"{path}:{line}:" in str(e.value)


def test_bad_blend_sources_and_config(shards, tmp_path):
    from megatron_ext.config import ConfigError, validate
    from megatron_ext.data import check_paths

    d, a, _ = shards
    with pytest.raises(ConfigError, match="no such file"):
        check_paths(_cfg(tmp_path, blend_file=str(tmp_path / "nope.txt")))
    with pytest.raises(ConfigError, match=r"holds no \*\.idx"):
        check_paths(_cfg(tmp_path, blend_file=str(tmp_path)))
    from megatron_ext.cli import load_config

    for overrides, fragment in [
        ([f"data.blend_file={d}", f"data.paths=[{a}]"], "both name the data"),
        ([f"data.blend_file={d}", "data.weights=[1.0]"], "both name the data"),
        ([f"data.paths=[{a},{a}]", "data.weights=[1.0,0.0]"], "every weight must be a positive number"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            validate(load_config(overrides), 1)
    from megatron_ext import stages

    with pytest.raises(ConfigError, match="cpt.mixture_steps needs explicit data.paths"):
        stages.make(load_config(["stage=cpt_math", f"data.blend_file={d}", "cpt.mixture_steps=[0]",
                                 "cpt.mixture_weights=[[1.0]]"]))


def test_empty_split_is_named_not_a_hang(tmp_path):
    """Megatron-Core loops forever filling a split with no tokens; the build names it instead."""
    from megatron_ext.config import ConfigError
    from megatron_ext.data import build_datasets

    small = _shard(tmp_path / "small", 3000, 10, 10)  # 98% of 10 documents rounds to all 10
    with pytest.raises(ConfigError, match="the valid split of .*small holds no tokens"):
        build_datasets(_cfg(tmp_path, paths=[small], split="98,2,0"), 10, 0)
    build_datasets(_cfg(tmp_path, paths=[small], split="100,0,0"), 10, 0)


def _run_train(rank, world_size, overrides):
    from megatron_ext.cli import load_config
    from megatron_ext.config import validate
    from megatron_ext.data import check_paths
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    cfg = load_config(overrides)
    validate(cfg, world_size)
    check_paths(cfg)
    return [h["loss"] for h in train(cfg, PretrainStage()).history]


def test_unweighted_shards_train_past_one_epoch(shards, tmp_path):
    """Before: Megatron-Core's unweighted blend held one pass, and the run stopped there with
    StopIteration. Steps x batch here is more than two passes over both shards."""
    from tests.forked_ranks import run_on_ranks

    _, a, b = shards
    epoch = (IndexedReader(a).num_tokens + IndexedReader(b).num_tokens) // SEQ
    steps, gbs = 2 * epoch // 4 + 2, 4
    losses, = run_on_ranks(_run_train, 1, [
        "model=qwen3_debug", f"data.paths=[{a},{b}]", f"data.seq_length={SEQ}", f"train.steps={steps}",
        f"train.global_batch_size={gbs}", "train.micro_batch_size=4", "train.eval_interval=0",
        f"data.cache_dir={tmp_path / 'cache'}"])
    assert len(losses) == steps and steps * gbs > 2 * epoch and all(np.isfinite(losses))
