"""Pretraining data: Megatron-Core GPTDatasets over indexed `.bin/.idx` files, and the loader.

The datasets come from Megatron-Core's `BlendedMegatronDatasetBuilder` (blending, splits,
cached shuffle indices). The loader hands each data-parallel rank its slice of every global
micro-batch slot, exactly as Megatron-LM's pretraining sampler does, so DP=N sees the same
samples as one process and a run can resume from `consumed_samples`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.utils import get_batch_on_this_cp_rank

from data_prep import SAMPLE_CORPUS
from data_prep.blend import is_number
from data_prep.indexed import IndexedReader, bin_path, idx_path
from data_prep.tokenizer import get_tokenizer
from megatron_ext import patches
from megatron_ext.config import Config, ConfigError

log = logging.getLogger(__name__)


def build_sample_corpus(out_prefix: Path, tokenizer_name: str) -> Path:
    """Tokenize the bundled sample corpus into `out_prefix.bin/.idx` (atomically; skipped if present)."""
    bin_path, idx_path = Path(f"{out_prefix}.bin"), Path(f"{out_prefix}.idx")
    if bin_path.exists() and idx_path.exists():
        return out_prefix
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(tokenizer_name)
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tmp_bin = Path(f"{out_prefix}.tmp{os.getpid()}.bin")
    tmp_idx = Path(f"{out_prefix}.tmp{os.getpid()}.idx")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=np.int32)
    for ids in tokenizer.encode_batch(texts):
        builder.add_document(np.asarray(ids + [tokenizer.eod], dtype=np.int32), [len(ids) + 1])
    builder.finalize(str(tmp_idx))
    # .bin first, .idx last: a reader never finds an .idx next to a partial .bin.
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    log.info("tokenized the sample corpus: %d documents -> %s", len(texts), out_prefix)
    return out_prefix


def token_counts(prefixes: List[str]) -> List[int]:
    """Tokens in each dataset, read from its `.idx` (no `.bin` data is read)."""
    return [IndexedReader(p).num_tokens for p in prefixes]


def _blend_dir(directory: Path) -> Tuple[List[str], List[float]]:
    prefixes = sorted(str(p)[:-4] for p in directory.glob("*.idx"))
    if not prefixes:
        raise ConfigError(f"data.blend_file={directory}: the directory holds no *.idx datasets")
    for prefix in prefixes:
        _check_blend_prefix(prefix, f"data.blend_file={directory}: {prefix}")
    return prefixes, [float(n) for n in token_counts(prefixes)]


def _check_blend_prefix(prefix: str, where: str, hint: str = " (entries are prefixes without .bin/.idx)") -> None:
    """Both files of a dataset exist, its index matches its `.bin`, and it holds tokens;
    ConfigError names `where`, the file and what is wrong (`hint` when a suffix was given)."""
    hint = hint if prefix.endswith((".bin", ".idx")) else ""
    for path in (bin_path(prefix), idx_path(prefix)):
        if not path.is_file():
            raise ConfigError(f"{where}: {path} does not exist{hint}")
    try:
        reader = IndexedReader(prefix)
    except (ValueError, OSError) as e:  # the messages name the file
        raise ConfigError(f"{where}: unreadable dataset: {e}") from None
    if reader.num_tokens == 0:
        raise ConfigError(f"{where}: {bin_path(prefix)} holds no tokens ({len(reader)} documents); "
                          "tokenize some text into it first")


def read_blend_file(path: str) -> Tuple[List[str], List[float]]:
    """`data.blend_file` -> (prefixes, weights) for Megatron-Core.

    A directory: every `*.idx` prefix in it (sorted by name), weighted by token count. A file:
    Megatron-LM's `--data-args-path` form, `weight prefix weight prefix ...` over any number of
    lines (`#` starts a comment), or prefixes only, weighted by token count. Relative prefixes
    are relative to the file's directory. Every dataset is checked as `check_paths` does;
    ConfigError names FILE:LINE and what is wrong."""
    source = Path(path)
    if source.is_dir():
        return _blend_dir(source)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data.blend_file={path}: no such file or directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.blend_file={path}: unreadable: {e}") from None
    items = []  # (line number, token)
    for line_no, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].split():
            items.append((line_no, token))
    if not items:
        raise ConfigError(f"data.blend_file={path}: {path} is empty (no 'weight prefix' entries)")
    base = source.parent
    pairs = is_number(items[0][1])
    if pairs and len(items) % 2:
        line_no, token = items[-1]
        raise ConfigError(f"{path}:{line_no}: weight {token} has no prefix after it")
    prefixes, weights = [], []
    for k in range(0, len(items), 2 if pairs else 1):
        line_no, prefix = items[k + 1] if pairs else items[k]
        if pairs:
            w_line, w = items[k]
            if not is_number(w):
                raise ConfigError(f"{path}:{w_line}: expected a weight, got {w!r} (entries are 'weight prefix')")
            weight = float(w)
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"{path}:{w_line}: weight {w} must be a positive number")
            if is_number(prefix):
                raise ConfigError(f"{path}:{line_no}: expected a prefix after weight {w}, got {prefix!r}")
            weights.append(weight)
        elif is_number(prefix):
            raise ConfigError(f"{path}:{line_no}: {prefix!r} looks like a weight, but the file starts with a "
                              "prefix: give 'weight prefix' pairs throughout or prefixes only")
        prefix = os.path.expanduser(prefix)
        resolved = prefix if os.path.isabs(prefix) or str(base) == "." else os.path.join(base, prefix)
        _check_blend_prefix(resolved, f"{path}:{line_no}: prefix {prefix}")
        prefixes.append(resolved)
    if not pairs:
        weights = [float(n) for n in token_counts(prefixes)]
    return prefixes, weights


def resolve_blend_file(cfg: Config) -> None:
    """Replace `data.blend_file` by the `data.paths`/`data.weights` it names (in place), so the
    resume check (`checkpoint.data_fingerprint`) and the saved config see the blend itself."""
    d = cfg.data
    if not d.blend_file:
        return
    if d.paths or d.weights is not None:
        raise ConfigError(f"data.blend_file={d.blend_file} and data.paths/data.weights both name the data; give one")
    prefixes, weights = read_blend_file(d.blend_file)
    log.info("data.blend_file=%s: %d datasets", d.blend_file, len(prefixes))
    d.paths, d.weights, d.blend_file = prefixes, weights, None


def blend(cfg: Config) -> Tuple[List[str], Optional[List[float]]]:
    """(prefixes, weights) of `data.paths`/`data.weights` or `data.blend_file` as Megatron-Core
    gets them. Several paths without weights are weighted by token count: Megatron-Core's
    unweighted blend is one pass over the data (it stops after an epoch), its weighted blend
    repeats each dataset as often as the run needs. A single path keeps `None` (Megatron-Core
    builds it at the requested size, repeating epochs)."""
    d = cfg.data
    if d.blend_file and not d.paths:
        return read_blend_file(d.blend_file)
    prefixes = list(d.paths)
    weights = list(d.weights) if d.weights else None
    if weights is None and len(prefixes) > 1:
        weights = [float(n) for n in token_counts(prefixes)]
    return prefixes, weights


def check_paths(cfg: Config) -> None:
    """Check every `data.paths` dataset before anything is built (cheap: reads the indices only):
    both files exist, the index is a Megatron index that matches its `.bin`, and the dataset holds
    tokens. ConfigError names the entry, the file and what is wrong. A `data.blend_file` is read
    first (errors name FILE:LINE) and replaced by the paths and weights it names."""
    resolve_blend_file(cfg)
    for k, prefix in enumerate(cfg.data.paths):
        _check_blend_prefix(prefix, f"data.paths[{k}]={prefix}",
                            f" (entries are prefixes without .bin/.idx: data.paths=[{prefix[:-4]}])")


def cache_dir(cfg: Config) -> Path:
    """`data.cache_dir`, or its default: next to the run's checkpoints, else the user's cache."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir) / "cache"
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "qwen_megatron" / "data"


def _blend(cfg: Config):
    if cfg.data.paths or cfg.data.blend_file:
        if cfg.data.paths:
            check_paths(cfg)
        return blend(cfg)
    prefix = cache_dir(cfg) / f"sample_{cfg.data.tokenizer}"
    if torch.distributed.get_rank() == 0:
        build_sample_corpus(prefix, cfg.data.tokenizer)
    torch.distributed.barrier()
    return [str(prefix)], None


def check_splits(prefixes: List[str], split: str) -> None:
    """Every split of every dataset that Megatron-Core builds holds tokens: it cuts each dataset's
    documents by `data.split` and loops forever repeating an empty split to fill its samples."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        reader = IndexedReader(prefix)
        n_docs = len(reader.document_indices) - 1
        for name, bounds in zip(("train", "valid", "test"), matrix):
            if bounds is None:
                continue
            begin, end = (int(round(b * float(n_docs))) for b in bounds)
            first, last = int(reader.document_indices[begin]), int(reader.document_indices[end])
            if int(reader.lengths[first:last].sum(dtype=np.int64)) == 0:
                raise ConfigError(f"data.split={split}: the {name} split of {prefix} holds no tokens "
                                  f"(documents [{begin}, {end}) of {n_docs}); give it more documents or "
                                  f"a data.split without a {name} share")


def build_datasets(cfg: Config, train_samples: int, valid_samples: int):
    """Train and validation GPTDatasets (None for splits with no data)."""
    patches.apply()  # among them: the cached indices are read without pickle
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    prefixes, weights = _blend(cfg)
    check_splits(prefixes, cfg.data.split)
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.data.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=str(cache_dir(cfg) / "index_cache"),
        # Only vocab_size and eod are read. No pad: Qwen pads with <|endoftext|>, which would
        # make Megatron mask every real end-of-document label.
        tokenizer=SimpleNamespace(
            vocab_size=tokenizer.vocab_size, eod=tokenizer.eod,
            # Part of the cache key of Megatron's shuffle indices.
            unique_identifiers={"class": type(tokenizer).__name__, "name": cfg.data.tokenizer},
        ),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    try:
        datasets = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, ds_config
        ).build()
    except patches.IndexCacheError as e:
        raise ConfigError(f"data.cache_dir: {e}") from None
    return datasets[0], datasets[1]


def _to_device(t: torch.Tensor) -> torch.Tensor:
    """`t` on this rank's GPU. A host tensor is pinned first (the loader's batches already are),
    so the copy is queued without waiting for the device's work."""
    if t.is_cuda:
        return t
    return (t if t.is_pinned() else t.pin_memory()).cuda(non_blocking=True)


def on_this_rank(batch: dict) -> dict:
    """Move a micro-batch to this rank's device and keep its context-parallel share."""
    if torch.cuda.is_available():
        batch = {k: _to_device(v) for k, v in batch.items()}
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch)
    return batch


def packed_seq_params(cu_seqlens: torch.Tensor):
    """Megatron PackedSeqParams (thd) for one packed sequence with document boundaries
    `cu_seqlens` (int32, [docs + 1], each length a multiple of 2*CP, padding included).

    The boundaries go to this rank's device, where Transformer Engine's attention and RoPE
    kernels read them; the host values stay attached to them (`patches.host_copy`), so the local
    attention and RoPE plan from them without copying anything back from the device (a
    device-to-host copy waits for all queued work)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    host = cu_seqlens.cpu().to(torch.int32)
    longest = int((host[1:] - host[:-1]).max())
    cu = host
    if torch.cuda.is_available():
        cu = _to_device(host)
        cu.host_copy = host
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


def packed_on_this_rank(batch: dict, cu_seqlens: torch.Tensor) -> dict:
    """A packed micro-batch ([1, T] tensors) on this rank: moved to the device and, under CP,
    cut document by document (each document split like a whole sequence, chunks r and
    2*CP-1-r on rank r), the layout the packed attention and Megatron's thd RoPE expect."""
    from megatron_ext.local_layers import thd_token_positions

    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:  # cut on the host, where the pack was just built: only this rank's share is copied
        _, _, index = thd_token_positions(cu_seqlens, parallel_state.get_context_parallel_rank(), cp)
        batch = {k: v.index_select(1, index.to(v.device)) if v.dim() >= 2 else v for k, v in batch.items()}
    if torch.cuda.is_available():
        batch = {k: _to_device(v) for k, v in batch.items()}
    return batch


class MicroBatchSampler:
    """Yields this DP rank's index list for each micro-batch, from `consumed_samples` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[List[int]]:
        yield from micro_batch_indices(self.consumed, self.total - self.consumed, self.mbs, self.dp_rank, self.dp_size)


def micro_batch_indices(start: int, samples: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int) -> Iterator[List[int]]:
    """Sample indices of this DP rank's micro-batches among `samples` samples from `start`:
    each group of mbs*dp consecutive samples gives rank r its r-th block of mbs."""
    step = micro_batch_size * dp_size
    for begin in range(start, start + samples - step + 1, step):
        first = begin + dp_rank * micro_batch_size
        yield list(range(first, first + micro_batch_size))


def loader(dataset, cfg: Config, consumed_samples: int = 0) -> Optional[Iterator[dict]]:
    """An endless-enough iterator of micro-batches for this rank (None if no dataset)."""
    if dataset is None:
        return None
    sampler = MicroBatchSampler(
        len(dataset), consumed_samples, cfg.train.micro_batch_size,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
    )
    # Pinned host batches make the per-micro-batch copy to the GPU asynchronous (on_this_rank).
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.data.num_workers > 0,
    ))
