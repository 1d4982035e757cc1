"""Dump the logits of a Megatron checkpoint's model for given token ids.

    python -m tools.logits --ckpt CKPT --tokens "1,2,3" --out logits.npy [--all] [--tp N --pp N --ep N --etp N --sp]

Several inputs of equal length can be given as "1,2,3;4,5,6". The model runs forward at the
requested layout (local gloo ranks are spawned when not launched by torchrun) through
Megatron's pipeline schedule; the vocabulary-parallel logits are gathered across tensor-parallel
ranks and one rank writes a float32 array: [inputs, vocab] for the last position of each input,
or [inputs, positions, vocab] with --all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from tools import launch
from tools import mcore_ckpt as mc


def parse_tokens(text: str) -> torch.Tensor:
    """'1,2,3;4,5,6' -> LongTensor [inputs, positions]."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected comma-separated integers, inputs separated by ';'") from None
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise ValueError(f"--tokens {text!r}: need one or more non-empty inputs of equal length")
    return torch.tensor(rows, dtype=torch.long)


def forward_logits(chunks: List[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits [inputs, positions, vocab] on the last pipeline stage; None elsewhere."""
    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def step(data_iterator, model):
        next(data_iterator)
        # No loss function: the schedule hands the last stage's raw output back to us.
        return model(tokens, positions, attention_mask=None), None

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=chunks, num_microbatches=1,
            seq_length=seq, micro_batch_size=batch, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = outputs[0].float()  # [inputs, positions, vocab / tp]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _writer() -> bool:
    """One rank writes: last pipeline stage, first tensor- and data-parallel rank."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _logits_rank(ckpt: str, tokens: torch.Tensor, out: str, all_positions: bool, layout: dict) -> str:
    src = mc.open_checkpoint(ckpt)
    m = src.model
    if int(tokens.max()) >= m.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids must be in [0, {m.vocab_size}) for {m.name}")
    chunks = mc.build(mc.layout_config(m, src.dtype, **layout))
    mc.load(chunks, src)
    logits = forward_logits(chunks, tokens)
    if _writer():
        result = logits if all_positions else logits[:, -1, :]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        np.save(out, result.numpy())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    mc.release_layout()
    return out


def dump_logits(ckpt: str, tokens: str, out: str, all_positions=False, tp=1, pp=1, ep=1, etp=None,
                sp=None) -> str:
    """Run the checkpoint's model at a layout and write its logits to `out` (.npy)."""
    ids = parse_tokens(tokens)
    m, dtype, _ = mc.read_meta(ckpt)
    layout = dict(tp=tp, pp=pp, ep=ep, etp=etp, sp=sp)
    if (sp or (sp is None and m.is_moe and tp > 1)) and ids.shape[1] % tp:
        raise ValueError(f"sequence parallelism splits the {ids.shape[1]} positions over tp={tp} ranks: "
                         f"give a multiple of {tp} tokens")
    world = mc.world_size(mc.layout_config(m, dtype, **layout))
    return launch.run(_logits_rank, world, ckpt, ids, out, all_positions, layout)


def main(argv=None) -> int:
    """Command-line entry; returns the exit status (2 with a one-line message on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m tools.logits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a tools.convert checkpoint, or a training checkpoint (iter_N or its root)")
    parser.add_argument("--tokens", required=True, help='e.g. "1,2,3" or "1,2,3;4,5,6"')
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--all", action="store_true", help="logits of every position, not just the last")
    for flag in ("tp", "pp", "ep"):
        parser.add_argument(f"--{flag}", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--sp", action="store_true", default=None,
                        help="sequence parallelism (default: on only where required, MoE with tp > 1)")
    args = parser.parse_args(argv)
    try:
        dump_logits(args.ckpt, args.tokens, args.out, args.all, args.tp, args.pp, args.ep, args.etp, args.sp)
    except (ValueError, KeyError, FileNotFoundError, launch.RankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
