"""Blend specs for Megatron-Core's dataset config, and the inspect CLI."""

import json

import pytest

from data_prep.blend import BlendSource, BlendSpec, make_blend
from data_prep.indexed import IndexedReader
from data_prep.inspect import main as inspect_main
from data_prep.tokenize import Options, tokenize


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    sizes = {"small": 5, "big": 40}
    for name, n in sizes.items():
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name} document {i} " + "word " * (i % 7 + 1)}) + "\n")
        tokenize([str(d / f"{name}.jsonl")], str(d / name), Options("qwen2", append_eod=True), quiet=True)
    return d


def test_weights_and_megatron_config(datasets):
    a, b = str(datasets / "small"), str(datasets / "big")
    blend = make_blend([a, b + ".bin"], [30, 70])
    assert blend == ([a, b], [0.3, 0.7])
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from data_prep.tokenizer import get_tokenizer

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=16, blend=blend, split="98,1,1",
                           tokenizer=get_tokenizer("qwen2"),
                           reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    assert cfg.blend == blend


def test_token_proportional_and_concat(datasets):
    a, b = str(datasets / "small"), str(datasets / "big")
    ta, tb = IndexedReader(a).num_tokens, IndexedReader(b).num_tokens
    prefixes, weights = BlendSpec([BlendSource(a), BlendSource(b, 2.0)], mode="tokens").resolve()
    assert prefixes == [a, b]
    assert weights == pytest.approx([ta / (ta + 2 * tb), 2 * tb / (ta + 2 * tb)])
    assert make_blend([a, b]) == ([a, b], None)
    assert BlendSpec.from_list(["1", a, "3", b]).resolve() == ([a, b], [0.25, 0.75])
    assert BlendSpec.from_mapping({"mode": "tokens", "sources": [a, {"prefix": b}]}).resolve()[1] == \
        pytest.approx([ta / (ta + tb), tb / (ta + tb)])


def test_blend_errors_name_the_problem(datasets, tmp_path):
    a = str(datasets / "small")
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"half\.idx"):
        make_blend([a, str(tmp_path / "half")], [1, 1])
    with pytest.raises(FileNotFoundError, match=r"nope\.bin, .*nope\.idx"):
        make_blend([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="must be a positive number"):
        make_blend([a], [0])
    with pytest.raises(ValueError, match="more than once"):
        make_blend([a, a], [1, 1])
    with pytest.raises(ValueError, match="mixes weights and paths"):
        BlendSpec.from_list(["1", a, a])
    with pytest.raises(ValueError, match="unknown blend keys"):
        BlendSpec.from_mapping({"paths": [a]})


def test_inspect_reports_counts_and_decodes(datasets, capsys):
    assert inspect_main([str(datasets / "big"), "--samples", "40", "--max-chars", "1000"]) == 0
    out = capsys.readouterr().out
    r = IndexedReader(datasets / "big")
    assert f"documents {len(r):,}" in out and f"tokens    {r.num_tokens:,}" in out
    assert "ending in eod (151643): 40 of 40" in out
    for i in range(40):  # every document is sampled and decodes to its source text
        assert f"big document {i} " + "word " * (i % 7 + 1) + "<|endoftext|>" in out
    assert inspect_main([str(datasets / "missing")]) == 1
    assert "missing.idx" in capsys.readouterr().err


def test_megatron_builds_blended_gpt_dataset(datasets):
    """The blend drives Megatron-Core's BlendedMegatronDatasetBuilder; samples follow the weights."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from data_prep.tokenizer import get_tokenizer

    tok = get_tokenizer("qwen2")
    blend = make_blend([str(datasets / "small"), str(datasets / "big")], [1, 3])
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=16, blend=blend, split="100,0,0", tokenizer=tok,
                           reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                           path_to_cache=None, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [400, 0, 0], lambda: True, cfg).build()
    counts = [int((train.dataset_index == k).sum()) for k in (0, 1)]
    assert len(train) == 400 and counts == [100, 300]
    text = tok.decode(train[0]["tokens"].tolist())
    assert "document" in text or "word" in text
