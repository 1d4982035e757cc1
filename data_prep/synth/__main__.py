"""python -m data_prep.synth: write a verified synthetic corpus as jsonl.

    python -m data_prep.synth programmatic --domain math --kinds arithmetic,linear --n 1000 --seed 0 --out math.jsonl
    python -m data_prep.synth programmatic --domain code --n 500 --out code.jsonl
    python -m data_prep.synth model --tasks math:linear --n 100 --base-url http://localhost:8000 \\
        --model NAME [--chat] --samples 4 --temperature 0.8 --out model_math.jsonl
    python -m tools.synth model --tasks tasks.jsonl --ckpt CKPT [--tokenizer qwen3] ...   # our own model
    python -m tools.synth model ... --rm RM_CKPT [--rm-keep best|N|all]   # ranked by a reward model

(data_prep depends on no training code: sampling from a Megatron checkpoint is `tools.synth`,
the same command with the training runtime as one more backend.)

Then: python -m data_prep.tokenize --input math.jsonl --output-prefix out/math --tokenizer qwen3 --append-eod
"""

from __future__ import annotations

import argparse
import sys
from itertools import chain, islice
from typing import Optional

from data_prep.readers import read_json_lines
from data_prep.synth import backends, code_gen, math_gen
from data_prep.synth.records import write_jsonl


def _programmatic(a) -> int:
    if a.domain == "math":
        kinds = a.kinds.split(",") if a.kinds else sorted(math_gen.KINDS)
        per = -(-a.n // len(kinds))
        records = chain.from_iterable(math_gen.generate(k, per, a.seed) for k in kinds)
    else:
        records = code_gen.generate(a.n, a.seed)
    return write_jsonl(records, a.out)


def _load_tasks(spec: str, n: int, seed: int):
    if spec.startswith("math:"):
        return backends.math_tasks(spec.split(":", 1)[1], n, seed)
    if spec == "code":
        return backends.code_tasks(n, seed)
    # The first n tasks of a jsonl file, read with the tokenizer's limits (a line over 16 MiB or
    # nested deeper than 100 levels is a ValueError naming file:line, as is one that is not JSON).
    return [task for _, task in islice(read_json_lines(spec), n)]


def _rm_keep(value: str) -> Optional[int]:
    """--rm-keep: best (1), all (None) or a positive number of completions per problem."""
    if value in ("best", "all"):
        return 1 if value == "best" else None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not best, all or a positive integer")


def _model(a, checkpoint_backend, rm_scorer=None) -> int:
    if a.rm:
        if rm_scorer is None:
            raise ValueError("--rm ranks by a reward model, which needs the training runtime: "
                             "run python -m tools.synth with the same arguments")
        rm_scorer.check(a.rm)  # before any sampling
    tasks = _load_tasks(a.tasks, a.n, a.seed)
    if a.ckpt:
        if checkpoint_backend is None:
            raise ValueError("--ckpt samples from a Megatron checkpoint, which needs the training runtime: "
                             "run python -m tools.synth with the same arguments")
        records = checkpoint_backend(a, tasks)
    elif a.base_url and a.model:
        backend = backends.OpenAIBackend(a.base_url, a.model, chat=a.chat)
        records = backends.rejection_sample(backend, tasks, a.samples, a.temperature, a.max_tokens, a.seed)
    else:
        raise ValueError("model synthesis needs --ckpt (our model) or --base-url and --model (an endpoint)")
    if a.rm:  # Qwen2.5-Math's RM-ranked rejection sampling: the verified completions the RM scores best
        records = list(records)
        records = backends.keep_best_scored(records, rm_scorer.score(a, records), a.rm_keep)
    return write_jsonl(records, a.out)


def main(argv=None, checkpoint_backend=None, prog: str = "python -m data_prep.synth", rm_scorer=None) -> int:
    """Command-line entry; returns the exit status (2 with a one-line message on bad input).

    `checkpoint_backend(args, tasks) -> records` serves `model --ckpt`, and `rm_scorer` (with
    `check(path)` and `score(args, records) -> scores`) serves `model --rm` (tools.synth passes both)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("programmatic", help="generated problems with computed answers / tests")
    p.add_argument("--domain", choices=["math", "code"], required=True)
    p.add_argument("--kinds", help=f"math kinds, comma-separated (default all: {','.join(sorted(math_gen.KINDS))})")
    m = sub.add_parser("model", help="model completions kept by rejection sampling through the verifiers")
    m.add_argument("--tasks", required=True, help="math:<kind> | code | a tasks .jsonl")
    m.add_argument("--base-url")
    m.add_argument("--model")
    m.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    m.add_argument("--ckpt", help="sample from this Megatron checkpoint instead of an endpoint (python -m tools.synth)")
    m.add_argument("--tokenizer")
    m.add_argument("--eos", type=int, default=None)
    m.add_argument("--samples", type=int, default=4)
    m.add_argument("--temperature", type=float, default=0.8)
    m.add_argument("--top-p", type=float, default=1.0)
    m.add_argument("--max-tokens", type=int, default=512)
    m.add_argument("--rm", help="keep, per problem, the verified completions this reward model checkpoint scores "
                                "best, with their scores (python -m tools.synth)")
    m.add_argument("--rm-keep", type=_rm_keep, default=1, metavar="best|N|all",
                   help="with --rm: the best completion (default), the N best, or all of them, per problem")
    for q in (p, m):
        q.add_argument("--n", type=int, default=100, help="records (programmatic) / tasks (model)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        n = _programmatic(a) if a.mode == "programmatic" else _model(a, checkpoint_backend, rm_scorer)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} verified records to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
