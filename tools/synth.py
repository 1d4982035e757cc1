"""python -m tools.synth: `python -m data_prep.synth` with our own model as one more backend.

    python -m tools.synth model --tasks math:linear --n 100 --ckpt CKPT [--tokenizer qwen3] \\
        --samples 4 --temperature 0.8 --out model_math.jsonl

Every other mode and flag is data_prep.synth's. The checkpoint is checked against its manifest,
built in its saved precision on one rank, and sampled with megatron_ext.generation (KV cache).
"""

from __future__ import annotations

import sys

from data_prep.synth import backends
from data_prep.synth.__main__ import main as synth_main
from data_prep.tokenizer import get_tokenizer
from megatron_ext.generation import MegatronBackend
from tools import launch
from megatron_ext import checkpoint, offline


def _rank(a, tasks):
    src = checkpoint.open_checkpoint(a.ckpt)
    tok_name = a.tokenizer or (str(src.tokenizer_dir) if src.tokenizer_dir else src.tokenizer_name)
    if not tok_name:
        raise ValueError(f"{a.ckpt} names no tokenizer: pass --tokenizer")
    chunks = offline.build(offline.layout_config(src.model, src.dtype))
    checkpoint.load_weights(chunks, src)
    backend = MegatronBackend(chunks, get_tokenizer(tok_name), a.eos, a.top_p, name=f"megatron:{a.ckpt}")
    return list(backends.rejection_sample(backend, tasks, a.samples, a.temperature, a.max_tokens, a.seed))


def checkpoint_records(a, tasks):
    return launch.run(_rank, 1, a, tasks)


def main(argv=None) -> int:
    return synth_main(argv, checkpoint_backend=checkpoint_records, prog="python -m tools.synth")


if __name__ == "__main__":
    sys.exit(main())
