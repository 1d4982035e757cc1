"""Checkpoints from anyone: reading one never runs code from it, never reads outside it, and
never allocates what its config claims before the weights confirm it.

Each attack plants a payload that, read with plain pickle / `torch.load(weights_only=False)`,
creates a marker file (and still returns the real content, so the load would go on unnoticed).
Every reader must refuse it with a CheckpointError naming the file and the global, and the
marker must not exist afterwards: `load_weights` (tools.logits / generate / eval, reference
models), a full resume, and `python -m tools.convert mcore-to-hf`.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import zlib
from pathlib import Path

import pytest
import torch

from tests.forked_ranks import run_on_ranks
from tests.test_convert import save_hf

BASE = ["train.steps=1", "train.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
        "data.seq_length=16", "checkpoint.keep_last=0"]


class _Exec:
    """Pickles as a call of exec (no class of this module is needed to unpickle it)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def live_pickle(real: bytes, marker: Path) -> bytes:
    """Pickle bytes that create `marker` and then unpickle to the object `real` holds (raw
    opcodes: GLOBAL builtins.exec, REDUCE, POP, then the real pickle)."""
    return b"cbuiltins\nexec\n(V" + _touch(marker).encode("raw_unicode_escape") + b"\ntR0" + real


def _plant_metadata(dist_dir: Path, marker: Path) -> None:
    path = dist_dir / ".metadata"
    path.write_bytes(live_pickle(path.read_bytes(), marker))


def _edit_metadata(dist_dir: Path, edit) -> None:
    """Rewrite `.metadata` after edit(metadata) (our own file, so plain pickle reads it here)."""
    path = dist_dir / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _plant_torch_file(path: Path, marker: Path) -> None:
    """Add an entry that runs code to a torch.save'd dict (the rest loads as before)."""
    state = torch.load(path, weights_only=True)
    state["note"] = _Exec(_touch(marker))
    torch.save(state, path)


def _plant_shard_object(dist_dir: Path, marker: Path) -> None:
    """Point the first object stored as bytes in a shard (a layer's _extra_state) at a payload
    appended to that shard."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def edit(metadata):
        index = next(i for i in metadata.storage_data
                     if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
        info = metadata.storage_data[index]
        payload = io.BytesIO()
        torch.save([_Exec(_touch(marker))], payload)
        shard = dist_dir / info.relative_path
        info.offset, info.length = shard.stat().st_size, len(payload.getvalue())
        with open(shard, "ab") as f:
            f.write(payload.getvalue())

    _edit_metadata(dist_dir, edit)


def _point_storage_outside(dist_dir: Path) -> None:
    def edit(metadata):
        info = next(iter(metadata.storage_data.values()))
        info.relative_path = "../../secret"

    _edit_metadata(dist_dir, edit)


def _refresh_manifest(ckpt: Path) -> None:
    """What an attacker does after editing a training checkpoint: a matching CRC manifest."""
    meta = json.loads((ckpt / "meta.json").read_text())
    files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"]
    meta["files"] = {str(p.relative_to(ckpt)): [p.stat().st_size, zlib.crc32(p.read_bytes())] for p in files}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _manifest_entry(ckpt: Path, entry: str) -> None:
    (ckpt.parent / "secret").write_text("not the checkpoint's business\n")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][entry] = [1, 0]
    (ckpt / "meta.json").write_text(json.dumps(meta))


_EXEC_IN_METADATA = ".metadata: refusing to unpickle global builtins.exec"
# case -> (checkpoint kind, attack(ckpt dir, marker), readers, what the error must name)
ATTACKS = {
    "metadata payload (training)": ("training", lambda c, m: _plant_metadata(c / "state", m),
                                    ("weights", "resume", "cli"), _EXEC_IN_METADATA),
    "metadata payload (converted)": ("converted", lambda c, m: _plant_metadata(c, m),
                                     ("weights", "cli"), _EXEC_IN_METADATA),
    "metadata entry outside": ("training", lambda c, m: _point_storage_outside(c / "state"),
                               ("weights",), ".metadata: storage entry"),
    "rng payload": ("training", lambda c, m: _plant_torch_file(c / "rng" / "rank_00000.pt", m),
                    ("resume",), "rank_00000.pt: refusing to unpickle it: Unsupported global: GLOBAL exec"),
    "common.pt payload (training)": ("training", lambda c, m: _plant_torch_file(c / "state" / "common.pt", m),
                                     ("weights", "resume"), "common.pt: refusing to unpickle it: Unsupported global"),
    "common.pt payload (converted)": ("converted", lambda c, m: _plant_torch_file(c / "common.pt", m),
                                      ("weights",), "common.pt: refusing to unpickle it: Unsupported global"),
    "shard object payload": ("training", lambda c, m: _plant_shard_object(c / "state", m),
                             ("weights", "resume"), "stored in a checkpoint shard: refusing to unpickle it"),
    "manifest ../secret": ("training", lambda c, m: _manifest_entry(c, "../secret"),
                           ("open", "resume"), "meta.json: manifest entry '../secret' points outside"),
    "manifest /etc/passwd": ("training", lambda c, m: _manifest_entry(c, "/etc/passwd"),
                             ("open", "resume"), "meta.json: manifest entry '/etc/passwd' points outside"),
}


def _read_weights(ckpt: Path) -> None:
    """The weights reader of tools.logits / generate / eval and reference models."""
    from megatron_ext import checkpoint, offline

    src = checkpoint.open_checkpoint(ckpt)
    chunks = offline.build(offline.layout_config(src.model, src.dtype))
    try:
        checkpoint.load_weights(chunks, src)
    finally:
        offline.release_layout()


def _resume(rt, ckpt: Path) -> None:
    """A full resume (checkpoint.load=<iter_N>): model, optimizer, scheduler, RNG."""
    from megatron_ext import checkpoint

    rt.config.checkpoint.load = str(ckpt)
    checkpoint.resume(rt)


def _convert_cli(ckpt: Path) -> None:
    from megatron_ext.checkpoint import CheckpointError
    from tools.convert import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["mcore-to-hf", "--ckpt", str(ckpt), "--out", f"{ckpt}_hf"])
    if code != 0:
        raise CheckpointError(f"exit {code}: {err.getvalue()}")


def _attack_table(rank, world_size, root, hf_dir):
    """In one rank: a 1-step training checkpoint and a converted one, then every attack on a
    fresh copy, read by each reader. Returns {(case, reader): error message or "loaded"}."""
    import shutil

    from megatron_ext import build, checkpoint
    from megatron_ext.cli import load_config
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage
    from tools.convert import hf_to_mcore

    root = Path(root)
    train(load_config(BASE + [f"checkpoint.dir={root}/train", "checkpoint.save_interval=1"]), PretrainStage())
    build.parallel_state.destroy_model_parallel()
    hf_to_mcore(hf_dir, str(root / "converted"))
    good = {"training": root / "train" / "iter_0000001", "converted": root / "converted"}
    rt = build.build(load_config(BASE + [f"checkpoint.dir={root}/unused"]))
    readers = {"open": checkpoint.open_checkpoint, "cli": _convert_cli, "weights": _read_weights,
               "resume": lambda ckpt: _resume(rt, ckpt)}
    outcomes = {}
    for reader in ("open", "resume", "weights", "cli"):  # resume first: the others release the layout
        for case, (kind, attack, case_readers, _) in ATTACKS.items():
            if reader not in case_readers:
                continue
            ckpt = root / "cases" / f"{case} {reader}".replace(" ", "_").replace("/", "")
            shutil.copytree(good[kind], ckpt)
            attack(ckpt, root / "markers" / ckpt.name)
            if kind == "training" and "manifest" not in case:
                _refresh_manifest(ckpt)
            try:
                readers[reader](ckpt)
                outcomes[case, reader] = "loaded"
            except checkpoint.CheckpointError as e:
                outcomes[case, reader] = f"{type(e).__name__}: {e}"
    return outcomes


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    (root / "markers").mkdir()
    hf_dir = save_hf("qwen3", False, root / "hf")
    (outcomes,) = run_on_ranks(_attack_table, 1, str(root), str(hf_dir))
    return root, outcomes


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_every_reader_refuses_the_attack(attacked, case):
    root, outcomes = attacked
    _, _, readers, names = ATTACKS[case]
    for reader in readers:
        outcome = outcomes[case, reader]
        assert outcome.startswith(("UnsafeCheckpointError", "CheckpointError")) and names in outcome, \
            (case, reader, outcome)
    assert not list((root / "markers").iterdir()), "a payload ran"


def test_unattacked_checkpoints_still_load_through_the_restricted_readers(attacked):
    """The plain copies (as saved) read by the same restricted readers give the same metadata."""
    from megatron_ext import safe_pickle

    root, _ = attacked
    for dist_dir in (root / "train" / "iter_0000001" / "state", root / "converted"):
        raw = (dist_dir / ".metadata").read_bytes()
        with open(dist_dir / ".metadata", "rb") as f:
            assert safe_pickle.load_metadata(f) == pickle.loads(raw)
        common = safe_pickle.torch_load(dist_dir / "common.pt")
        assert common.keys() == torch.load(dist_dir / "common.pt", weights_only=False).keys()


def test_payloads_are_live(tmp_path, attacked):
    """The payloads really run under plain pickle / torch.load(weights_only=False), and the
    planted objects still come back, so the refusals above are what stops them."""
    from torch.distributed.checkpoint.metadata import Metadata

    root, _ = attacked
    marker = tmp_path / "ran"
    real = (root / "converted" / ".metadata").read_bytes()
    assert isinstance(pickle.loads(live_pickle(real, marker)), Metadata) and marker.exists()
    marker.unlink()
    rng = tmp_path / "rank_00000.pt"
    rng.write_bytes((root / "train" / "iter_0000001" / "rng" / "rank_00000.pt").read_bytes())
    _plant_torch_file(rng, marker)
    assert "cpu" in torch.load(rng, weights_only=False) and marker.exists()


def test_weights_only_even_when_the_environment_turns_it_off(tmp_path, monkeypatch):
    from megatron_ext import safe_pickle
    from megatron_ext.checkpoint import CheckpointError

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = tmp_path / "common.pt", tmp_path / "ran"
    torch.save({"x": torch.zeros(2), "note": _Exec(_touch(marker))}, path)
    with pytest.raises(CheckpointError, match=r"common\.pt: refusing to unpickle it: Unsupported global"):
        safe_pickle.TORCH_WEIGHTS_ONLY.load(path, map_location="cpu")  # as Megatron-Core calls it
    assert not marker.exists()


# ---- Hugging Face directories (tools.convert hf-to-mcore): checked before any rank starts

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf("qwen3", False, tmp_path_factory.mktemp("hf") / "hf", max_shard_size="100KB")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors"])
def test_index_naming_a_shard_outside_the_directory_is_refused(hf_dir, tmp_path, shard):
    from tools.convert import hf_to_mcore
    from tools.hf_io import HFCheckpointError

    bad = _copy(hf_dir, tmp_path / "hf")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=re.escape(f"shard '{shard}' of tensor {name} is not a file inside")):
        hf_to_mcore(str(bad), str(tmp_path / "ckpt"))


@pytest.mark.parametrize("field, value, names", [
    ("hidden_size", 10 ** 9, r"HF tensor (lm_head|model\.embed_tokens)\.weight in \S+ has shape \[256, 64\], "
                             r"expected \[256, 1000000000\] \(config\.json: hidden_size=1000000000\)"),
    ("vocab_size", 10 ** 12, r"(lm_head|embed_tokens)\.weight .*\(config\.json: vocab_size=1000000000000\)"),
    ("intermediate_size", 10 ** 9, r"mlp\.(gate|up|down)_proj\.weight .*\(config\.json: intermediate_size=10+\)"),
    ("num_attention_heads", 10 ** 7, r"self_attn\.[qo]_proj\.weight .*\(config\.json: num_attention_heads \* head_dim="
                                     r"320000000\)"),
    ("num_hidden_layers", 10 ** 9, r"num_hidden_layers=1000000000, but the weights in .* hold 2 layers"),
    ("hidden_size", "64", r"hidden_size='64' is not a positive integer"),
])
def test_config_sizes_are_checked_against_the_weights_first(hf_dir, tmp_path, field, value, names):
    """Huge sizes in config.json fail fast, naming field and tensor, before anything is built."""
    from tools.convert import hf_to_mcore
    from tools.hf_io import HFCheckpointError

    bad = _copy(hf_dir, tmp_path / "hf")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(HFCheckpointError, match=names):
        hf_to_mcore(str(bad), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()
