"""Hugging Face checkpoint directories: lazy, validated reading and sharded writing.

Reading opens each `*.safetensors` file with `safe_open`, which reads only the header up front;
a tensor's bytes are read when it is asked for, so a converter holds one HF tensor at a time.
Writing buffers tensors up to a shard size, then writes `model-0000i-of-0000N.safetensors`
plus `model.safetensors.index.json`, the layout `transformers` loads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files next to the weights that describe the tokenizer and generation; copied through conversion.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


class HFCheckpointError(ValueError):
    """A malformed or incomplete HF checkpoint directory; the message names the file/tensor."""


def _safe_open(path: Path):
    """safe_open, with its errors (truncated file, bad header: `SafetensorError`, which names
    no file) turned into an HFCheckpointError naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises SafetensorError (not an OSError) and others
        size = path.stat().st_size if path.is_file() else 0
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({size} bytes; truncated or "
                                f"corrupted?): {e}") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{path}: not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(value, dict):
        raise HFCheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _check_shard_name(index: Path, tensor: str, file) -> None:
    """A shard the index names must lie in the model directory: the index comes with the
    download, and `../x` or an absolute path would read (and report on) files anywhere. Not
    resolved: Hugging Face's cache links each file of a snapshot to a blob outside it."""
    shard = PurePosixPath(file) if isinstance(file, str) else None
    if shard is None or not file or shard.is_absolute() or ".." in shard.parts:
        raise HFCheckpointError(f"{index}: shard {file!r} of tensor {tensor} is not a file inside {index.parent}")


def _file_mode() -> int:
    """The mode an ordinary new file gets here (0644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"bad size {text!r}; use e.g. 5GB, 500MB, 100KB")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * scale)


class HFCheckpoint:
    """An HF model directory: `config.json` plus safetensors weights (one file or an index)."""

    def __init__(self, hf_dir: str):
        self.dir = Path(hf_dir)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise HFCheckpointError(f"{config_path} not found: not an HF model directory")
        self.config = _read_json(config_path)
        self.weight_map = self._weight_map()
        self._handles: Dict[str, object] = {}

    def _weight_map(self) -> Dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index} has no weight_map")
            for name, file in sorted(weight_map.items()):
                _check_shard_name(index, name, file)
                if not (self.dir / file).is_file():
                    raise HFCheckpointError(f"missing shard {self.dir / file} (listed in {index.name} for tensor {name})")
            return weight_map
        single = self.dir / SINGLE_FILE
        if single.is_file():
            with _safe_open(single) as f:
                return {name: SINGLE_FILE for name in f.keys()}
        if any(self.dir.glob("*.bin")):
            raise HFCheckpointError(f"{self.dir} holds PyTorch .bin weights; save them as safetensors first")
        raise HFCheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.dir}")

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise HFCheckpointError(f"tensor {name} not found in {self.dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = _safe_open(self.dir / file)
        handle = self._handles[file]
        if name not in handle.keys():
            raise HFCheckpointError(f"tensor {name} is listed for {self.dir / file} but that file lacks it")
        return handle

    def names(self) -> List[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. A short-lived handle is used so the file's mapped pages are released
        right away; reading through the cached handles would leave every tensor read so far
        resident in this process (the whole model's worth by the end)."""
        self._handle(name)  # validates the name and its file
        with _safe_open(self.file_of(name)) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # SafetensorError names no file
                raise HFCheckpointError(f"{self.file_of(name)}: cannot read tensor {name}: {e}") from None

    def close(self) -> None:
        self._handles.clear()


class ShardWriter:
    """Writes tensors into size-capped safetensors shards plus the index transformers reads."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.dir, self.max = Path(out_dir), max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor; the current shard is written first if this one would overflow it."""
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._bytes + size > self.max:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        # Written under a provisional name: the shard count is known only at the end.
        path = self.dir / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, _file_mode())  # safetensors creates files 0600; give them the mode of the others
        self._shards.append(list(self._buffer))
        self._buffer, self._bytes = {}, 0

    def close(self) -> int:
        """Flush, name the shards, write the index; returns the number of shards."""
        if self._buffer:
            self._flush()
        n, weight_map = len(self._shards), {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return n


def tokenizer_files(src: Path) -> List[Path]:
    """Tokenizer/generation files present in `src`."""
    return [src / f for f in TOKENIZER_FILES if (src / f).is_file()]


def dtype_of(hf: HFCheckpoint, name: str) -> Optional[torch.dtype]:
    """The dtype a tensor is stored in (reads the header only)."""
    dtype = hf._handle(name).get_slice(name).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
