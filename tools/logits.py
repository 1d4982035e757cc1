"""Dump the logits of a Megatron checkpoint's model for given token ids.

    python -m tools.logits --ckpt CKPT --tokens "1,2,3" --out logits.npy [--all]
        [--tp N --pp N --vpp N --ep N --etp N --sp] [--no-verify]

Several inputs of equal length can be given as "1,2,3;4,5,6". The model runs forward at the
requested layout (local gloo ranks are spawned when not launched by torchrun) through the one
forward-only pass (`megatron_ext.forward`, virtual pipeline stages included); the
vocabulary-parallel logits are gathered across tensor-parallel ranks and one rank writes a
float32 array: [inputs, vocab] for the last position of each input,
or [inputs, positions, vocab] with --all. A training checkpoint's files are first checked against
its CRC manifest, as resuming does (--no-verify skips that).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from megatron.core import parallel_state

from data_prep.indexed import check_writable_dir
from tools import ranks
from megatron_ext import checkpoint, offline
from megatron_ext.forward import eval_mode
from megatron_ext.generation import forward


def parse_tokens(text: str) -> torch.Tensor:
    """'1,2,3;4,5,6' -> LongTensor [inputs, positions]."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected comma-separated integers, inputs separated by ';'") from None
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise ValueError(f"--tokens {text!r}: need one or more non-empty inputs of equal length")
    return torch.tensor(rows, dtype=torch.long)


def forward_logits(chunks: List[torch.nn.Module], tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Full-vocab float32 logits [inputs, positions, vocab] on the last pipeline stage (the
    output layer gathers the vocabulary across TP ranks); None elsewhere. Collective."""
    with eval_mode(chunks):
        return forward(chunks, tokens)


def _writer() -> bool:
    """One rank writes: last pipeline stage, first tensor- and data-parallel rank."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def npy_path(out: str) -> Path:
    """Where `out` is written: numpy's rule, `.npy` appended unless present."""
    return Path(out if out.endswith(".npy") else out + ".npy")


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _logits_rank(ckpt, tokens: torch.Tensor, out: str, all_positions: bool, layout: dict) -> list:
    """Write the logits (one rank does); every rank returns the shape written."""
    src = checkpoint.open_checkpoint(ckpt)
    m = src.model
    if int(tokens.max()) >= m.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids must be in [0, {m.vocab_size}) for {m.name}")
    chunks = offline.build(offline.layout_config(m, src.dtype, **layout))
    checkpoint.load_weights(chunks, src)
    logits = forward_logits(chunks, tokens)
    shape = None
    if _writer():
        result = logits if all_positions else logits[:, -1, :]
        _save_atomic(npy_path(out), result.numpy())
        shape = list(result.shape)
    shapes = [shape]
    if torch.distributed.is_initialized():  # also the barrier: the file exists once this returns
        shapes = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shapes, shape)
    offline.release_layout()
    return next(s for s in shapes if s is not None)


def dump_logits(ckpt: str, tokens: str, out: str, all_positions=False, tp=1, pp=1, ep=1, etp=None,
                sp=None, verify=True, vpp=None) -> Tuple[str, list]:
    """Run the checkpoint's model at a layout and write its logits to `out` (.npy); returns the
    path written and the array's shape. A training checkpoint is checked against its CRC
    manifest first (`verify`)."""
    ids = parse_tokens(tokens)
    src = checkpoint.open_checkpoint(ckpt, verify=verify)
    m, dtype = src.model, src.dtype
    layout = dict(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sp=sp)
    if (sp or (sp is None and m.is_moe and tp > 1)) and ids.shape[1] % tp:
        raise ValueError(f"sequence parallelism splits the {ids.shape[1]} positions over tp={tp} ranks: "
                         f"give a multiple of {tp} tokens")
    world = offline.world_size(offline.layout_config(m, dtype, **layout))
    check_writable_dir(npy_path(out).absolute().parent)
    shape = ranks.run(_logits_rank, world, src, ids, out, all_positions, layout)
    return str(npy_path(out)), shape


def main(argv=None) -> int:
    """Command-line entry; returns the exit status (2 with a one-line message on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m tools.logits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a tools.convert checkpoint, or a training checkpoint (iter_N or its root)")
    parser.add_argument("--tokens", required=True, help='e.g. "1,2,3" or "1,2,3;4,5,6"')
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--all", action="store_true", help="logits of every position, not just the last")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run the model at (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run the model at (default 1)")
    parser.add_argument("--vpp", type=int, default=None,
                        help="virtual pipeline stages per pipeline rank (interleaved schedule; needs --pp > 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size, MoE models (default 1)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: same as --tp)")
    parser.add_argument("--sp", action="store_true", default=None,
                        help="sequence parallelism (default: on only where required, MoE with tp > 1)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check a training checkpoint's files against its CRC manifest "
                             "(a corrupted checkpoint then runs silently)")
    args = parser.parse_args(argv)
    try:
        path, shape = dump_logits(args.ckpt, args.tokens, args.out, args.all, args.tp, args.pp, args.ep, args.etp,
                                  args.sp, verify=not args.no_verify, vpp=args.vpp)
    except (ValueError, KeyError, OSError, ranks.RankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one line, also when every rank of a launcher runs main()
        what = "every position" if args.all else "the last position"
        print(f"wrote {path}: float32 logits {shape} ({what} of {shape[0]} input(s)) from {args.ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
