"""python -m tools.synth: `python -m data_prep.synth` with our own model as one more backend.

    python -m tools.synth model --tasks math:linear --n 100 --ckpt CKPT [--tokenizer qwen3] \\
        --samples 4 --temperature 0.8 --out model_math.jsonl

    python -m tools.synth model ... --rm RM_CKPT [--rm-keep best|N|all]

Every other mode and flag is data_prep.synth's. The checkpoint is checked against its manifest,
built in its saved precision on one rank, and sampled with megatron_ext.generation (KV cache).

`--rm` (with --ckpt or an endpoint) is Qwen2.5-Math's RM-ranked rejection sampling: the reward
model (`python -m posttrain.rm`, or converted from Hugging Face with head rm; checked before any
sampling) scores every verified completion, with the prompt it was sampled for as the user turn
and the completion as the reply (`posttrain.rewards.rm_scores`), and per problem the best (or N
best, or all) are kept, each with its `rm_score` and `rm_rank` in the record.
"""

from __future__ import annotations

import sys

from data_prep.synth import backends
from data_prep.synth.__main__ import main as synth_main
from data_prep.tokenizer import get_tokenizer
from megatron_ext.generation import MegatronBackend
from tools import ranks
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
    return ranks.run(_rank, 1, a, tasks)


def _score_rank(path: str, tokenizer, pairs, batch_size: int):
    from megatron_ext.config import Config
    from posttrain.evals.runner import load_model, tokenizer_for
    from posttrain.rewards import rm_scores

    chunks, src = load_model(path, Config(), value_stage="rm")
    try:
        return rm_scores(chunks, get_tokenizer(tokenizer) if tokenizer else tokenizer_for(src, "qwen3"), pairs,
                         batch_size)
    finally:
        offline.release_layout()


class RewardModelScorer:
    """`--rm`: scores (record prompt, completion) pairs with a reward model checkpoint on one rank."""

    batch_size = 8

    @staticmethod
    def check(path: str) -> None:
        src = checkpoint.open_checkpoint(path)  # CheckpointError (a ValueError) names a missing one
        if src.head != "rm":
            raise ValueError(f"--rm {path}: not a reward model checkpoint (its head is {src.head}); it needs one "
                             "written by python -m posttrain.rm or converted from Hugging Face with head rm")

    def score(self, a, records):
        if not records:
            return []
        pairs = [(r["prompt"], r["completion"]) for r in records]
        return ranks.run(_score_rank, 1, a.rm, a.tokenizer, pairs, self.batch_size)


def main(argv=None) -> int:
    return synth_main(argv, checkpoint_backend=checkpoint_records, prog="python -m tools.synth",
                      rm_scorer=RewardModelScorer())


if __name__ == "__main__":
    sys.exit(main())
