"""Generation (megatron_ext.generation through tools.generate) against transformers and against
the full-recompute path, on the same converted weights (fp32, CPU).

Greedy continuations of a ragged batch must equal transformers' greedy `generate` row by row,
with the KV cache (the default) and without it (`use_cache=False`, every step recomputes the
whole sequence); the returned log-probs must equal transformers' log-softmax at those positions;
a batch must give each prompt its single-prompt tokens; TP=2 (with and without sequence
parallelism) and PP=2 must give the TP=1 ids with and without the cache; sampling must be
reproducible from its seed, equal between the two paths for equal-length prompts, and reduce to
greedy as top_p -> 0; end ids and stop strings must stop a row right after the token that ends it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_ext.generation import SamplingParams
from tests.forked_ranks import run_on_ranks
from tests.test_convert import save_hf
from tools.convert import hf_to_mcore

PROMPTS = [[5, 17, 200, 3, 99], [255, 0, 13], [42, 7, 8, 1, 2, 3, 4]]
EQUAL = [[5, 17, 200, 3], [255, 0, 13, 9], [42, 7, 8, 1]]
NEW = 6
GREEDY = SamplingParams(NEW, greedy=True)
SAMPLED = SamplingParams(NEW, temperature=1.2, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF dir, Megatron checkpoint, and (one spawned rank) the CLI's greedy rows + API variants."""
    root = tmp_path_factory.mktemp("gen")
    hf = save_hf("qwen2", False, root / "hf")
    cli, api = run_on_ranks(_convert_and_generate, 1, str(hf), str(root / "mcore"),
                            _cli_args(root / "mcore", root, extra=["--greedy"]))[0]
    return hf, root / "mcore", cli, api


def _convert_and_generate(rank, world, hf, out, cli_args):
    # One process for all single-rank checks: spawning and importing Megatron dominates the cost.
    hf_to_mcore(hf, out)
    rows = _cli(rank, world, cli_args)
    # Stop strings through the CLI: a character of row 0's text under a real Qwen tokenizer (its
    # first 256 ids are single bytes; not a replacement character of a split UTF-8 sequence), and
    # the recompute path through --no-cache.
    from data_prep.tokenizer import get_tokenizer

    tok = get_tokenizer("qwen2")
    stop = [next((c for c in tok.decode(rows[0]["ids"])[1:] if c != "\ufffd"), "?")]
    stopped = _cli(rank, world, cli_args + ["--tokenizer", "qwen2", "--stop", stop[0]])
    nocache = _cli(rank, world, cli_args + ["--no-cache"])
    return rows, dict(_api_variants(rank, world, out), cli_stop=(stop, stopped), cli_nocache=nocache)


def _cli(rank, world, args):
    from tools.generate import main

    out = f"{args[args.index('--out') + 1]}.{rank}"
    argv = list(args)
    argv[argv.index("--out") + 1] = out
    assert main(argv) == 0
    with open(out) as f:
        return [json.loads(line) for line in f]


def _cli_args(ckpt, tmp_path, world=1, extra=()):
    tokens = ";".join(",".join(map(str, p)) for p in PROMPTS)
    return ["--ckpt", str(ckpt), "--tokens", tokens, "--max-new-tokens", str(NEW), "--out", str(tmp_path / "g"),
            *extra] + (["--tp", str(world)] if world > 1 else [])


class _ByteTokenizer:
    """Bytes as token ids: fits the 256-entry vocabulary of the test model."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("latin-1")


def _api_variants(rank, world, ckpt):
    """Load once, then generate with each sampling setting through the Python API."""
    from megatron_ext import checkpoint, offline
    from tools.generate import SamplingParams, generate

    src = checkpoint.open_checkpoint(ckpt)
    chunks = offline.build(offline.layout_config(src.model, src.dtype))
    checkpoint.load_weights(chunks, src)
    runs = {"greedy": dict(greedy=True), "a": dict(temperature=1.5, seed=3), "b": dict(temperature=1.5, seed=3),
            "c": dict(temperature=1.5, seed=4), "nucleus": dict(temperature=1.5, top_p=1e-6, seed=5)}
    out = {k: generate(chunks, PROMPTS, SamplingParams(NEW, **kw)).tokens for k, kw in runs.items()}
    out["one_by_one"] = [generate(chunks, [p], GREEDY).tokens[0] for p in PROMPTS]
    nocache = generate(chunks, PROMPTS, GREEDY, use_cache=False)
    out["nocache"] = nocache.tokens
    out["lp"] = (generate(chunks, PROMPTS, GREEDY).logprobs, nocache.logprobs)
    out["nocache_one_by_one"] = [generate(chunks, [p], GREEDY, use_cache=False).tokens[0] for p in PROMPTS]
    # Equal-length prompts: both paths sample every row at every step from the same generator.
    out["sampled"] = [generate(chunks, EQUAL, SAMPLED, use_cache=c).tokens for c in (True, False)]
    # The synthesis backend over the same model: text in, text out through a byte tokenizer.
    from megatron_ext.generation import MegatronBackend

    backend = MegatronBackend(chunks, _ByteTokenizer())
    texts = backend.complete(["ab", "xyz"], 2, temperature=0, max_tokens=NEW, seed=0)
    out["backend"] = (texts, [generate(chunks, [list(p.encode())], GREEDY).tokens[0] for p in ("ab", "xyz")])
    eos = out["greedy"][0][2]
    stopped = generate(chunks, PROMPTS[:1], SamplingParams(NEW, greedy=True, eos_token_id=eos))
    out["eos"] = (stopped.tokens[0], stopped.finished[0], eos)
    # Several end ids (ChatML's <|im_end|> and <|endoftext|>), and stop strings, per row, both paths.
    ends = [out["greedy"][1][3], out["greedy"][2][1]]
    out["ends"] = [generate(chunks, PROMPTS, SamplingParams(NEW, greedy=True, eos_token_id=ends), use_cache=c)
                   for c in (True, False)]
    tok = _ByteTokenizer()
    stop = [tok.decode(out["greedy"][0][1:3]), tok.decode(out["greedy"][2][4:5])]
    out["stop"] = (stop, [generate(chunks, PROMPTS, SamplingParams(NEW, greedy=True, stop=stop), decode=tok.decode,
                                   use_cache=c) for c in (True, False)])
    offline.release_layout()
    return out


def _hf_greedy(hf, prompts=PROMPTS):
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids, lps = [], []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                                 pad_token_id=0, eos_token_id=None)
            new = out[0, len(p):]
            logits = model(out).logits[0, len(p) - 1:-1]
            ids.append(new.tolist())
            lps.append(torch.log_softmax(logits, -1).gather(-1, new[:, None]).squeeze(-1))
    return ids, lps


def test_greedy_equals_transformers(converted):
    hf, _, rows, out = converted
    ref_ids, ref_lps = _hf_greedy(hf)
    for row, ids, lps in zip(rows, ref_ids, ref_lps):
        assert row["ids"] == ids
        torch.testing.assert_close(torch.tensor(row["logprobs"]), lps, atol=1e-4, rtol=1e-4)
        assert row["finished"] is False
    assert out["nocache"] == ref_ids  # the full-recompute reference path agrees too
    cached_lp, nocache_lp = out["lp"]
    for a, b in zip(cached_lp, nocache_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


def test_cli_stop_string_and_no_cache(converted):
    _, _, rows, out = converted
    assert [r["ids"] for r in out["cli_nocache"]] == [r["ids"] for r in rows]
    stop, stopped = out["cli_stop"]
    from data_prep.tokenizer import get_tokenizer

    tok = get_tokenizer("qwen2")
    assert stop[0] in tok.decode(rows[0]["ids"])
    for row, full in zip(stopped, rows):
        text = tok.decode(full["ids"])
        if stop[0] not in text:
            assert row["ids"] == full["ids"] and not row["finished"] and "stop" not in row
            continue
        n = next(k for k in range(1, len(full["ids"]) + 1) if stop[0] in tok.decode(full["ids"][:k]))
        assert row["ids"] == full["ids"][:n] and row["finished"] and row["stop"] == stop[0]
        assert row["text"] == text[:text.index(stop[0])]
    assert stopped[0]["finished"] and len(stopped[0]["ids"]) < len(rows[0]["ids"])


def test_chatml_stop_ids():
    from data_prep.tokenizer import get_tokenizer
    from megatron_ext.generation import chatml_stop_ids

    tok = get_tokenizer("qwen2")
    assert chatml_stop_ids(tok) == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")] \
        == [151645, 151643]


@pytest.mark.slow
def test_greedy_tp2_equals_transformers(converted, tmp_path):
    hf, ckpt, _, _ = converted
    rows = run_on_ranks(_cli, 2, _cli_args(ckpt, tmp_path, world=2, extra=["--greedy"]))
    ref_ids, _ = _hf_greedy(hf)
    assert [r["ids"] for r in rows[0]] == ref_ids == [r["ids"] for r in rows[1]]


def test_api_batching_sampling_and_eos(converted):
    hf, _, _, out = converted
    # A ragged batch gives each prompt its single-prompt tokens, with and without the cache.
    assert out["greedy"] == out["one_by_one"] == out["nocache"] == out["nocache_one_by_one"] == _hf_greedy(hf)[0]
    assert out["a"] == out["b"]
    assert out["a"] != out["c"]  # 18 draws at temperature 1.5 from a near-uniform tiny model
    assert out["nucleus"] == out["greedy"]
    cached, nocache = out["sampled"]
    assert cached == nocache
    texts, ids = out["backend"]
    assert texts == [[bytes(i).decode("latin-1")] * 2 for i in ids]  # greedy: both samples equal generate()
    ids, finished, eos = out["eos"]
    assert finished and ids == out["greedy"][0][:ids.index(eos) + 1]


def test_end_ids_and_stop_strings(converted):
    _, _, _, out = converted
    greedy = out["greedy"]
    for gen in out["ends"]:
        ends = {greedy[1][3], greedy[2][1]}
        for i, row in enumerate(greedy):
            first = next((j for j, t in enumerate(row) if t in ends), None)
            assert gen.tokens[i] == (row if first is None else row[:first + 1])
            assert gen.finished[i] == (first is not None)
        assert gen.finished[1] and gen.finished[2]
    stop, gens = out["stop"]
    for gen in gens:
        for i, row in enumerate(greedy):
            text = bytes(row).decode("latin-1")
            ends_at = min((text.find(s) + len(s) for s in stop if s in text), default=None)
            assert gen.tokens[i] == (row if ends_at is None else row[:ends_at])
            assert gen.finished[i] == (ends_at is not None)
        assert gen.finished[0] and gen.finished[2]


def test_sample_next_top_p_keeps_nucleus():
    from tools.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.8, False, gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8; tokens 2 and 3 are outside the nucleus


def test_cut_at_stop():
    from megatron_ext.generation import cut_at_stop

    assert cut_at_stop("a+b=3\nQ: next", ["\nQ:", "="]) == ("a+b", "=")
    assert cut_at_stop("abc", ["x"]) == ("abc", None)
    assert cut_at_stop("abc", None) == ("abc", None)


# ---------------------------------------------------------------- parallel layouts, one spawn

LAYOUTS = {"tp2": dict(tp=2), "tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2)}


def _layouts(rank, world, ckpt):
    """Per layout: greedy ids and log-probs with and without the cache, a sampled run of each path
    on equal-length prompts, and the cached single-prompt runs."""
    from megatron_ext import checkpoint, offline
    from tools.generate import generate

    src = checkpoint.open_checkpoint(ckpt)
    out = {}
    for name, layout in LAYOUTS.items():
        chunks = offline.build(offline.layout_config(src.model, src.dtype, **layout))
        checkpoint.load_weights(chunks, src)
        cached = generate(chunks, PROMPTS, GREEDY)
        nocache = generate(chunks, PROMPTS, GREEDY, use_cache=False)
        out[name] = dict(sp=chunks[0].config.sequence_parallel, cached=cached.tokens, nocache=nocache.tokens, lp=(cached.logprobs, nocache.logprobs),
                         one_by_one=[generate(chunks, [p], GREEDY).tokens[0] for p in PROMPTS],
                         sampled=[generate(chunks, EQUAL, SAMPLED, use_cache=c).tokens for c in (True, False)])
        offline.release_layout()
    return out


def test_cache_equals_recompute_tp2_sp_pp2(converted):
    hf, ckpt, _, single = converted
    ranks = run_on_ranks(_layouts, 2, str(ckpt))
    assert ranks[0] == ranks[1]  # every rank returns the same ids and log-probs
    for name in LAYOUTS:
        got = ranks[0][name]
        assert got["sp"] == LAYOUTS[name].get("sp", False), name
        assert got["cached"] == got["nocache"] == got["one_by_one"] == single["greedy"], name
        for a, b in zip(*got["lp"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
        assert got["sampled"][0] == got["sampled"][1] == single["sampled"][0], name


def _bench(rank, world, out):
    from tools.bench_generate import main

    assert main(["model=qwen2_debug", "--new-tokens", "8", "--prompt-len", "6", "--batch", "2", "--ragged",
                 "--json", out]) == 0


def test_bench_generate_runs_both_paths(tmp_path):
    out = tmp_path / "bench.json"
    run_on_ranks(_bench, 1, str(out))
    r = json.loads(out.read_text())
    assert r["same_tokens"] is True and r["prompt_lengths"] == [3, 6] and r["new_tokens"] == 8
    assert r["cached"]["tokens_per_s"] > 0 and r["recompute"]["tokens_per_s"] > 0


def test_sampling_params_refuse_bad_values_and_stay_immutable():
    params = SamplingParams(4, eos_token_id=[3, 5], stop=["\n"])
    assert params.eos_token_id == (3, 5) and params.stop == ("\n",) and hash(params) == hash(SamplingParams(
        4, eos_token_id=(3, 5), stop=("\n",)))
    bad_values = ((dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2, temperature=-1), "temperature"),
                  (dict(max_new_tokens=2, top_p=0), "top_p"), (dict(max_new_tokens=2, stop="\n"), "stop"))
    for bad, word in bad_values:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1


def test_cli_refuses_bad_sampling_values_before_loading(tmp_path, capsys):
    from tools.generate import main

    assert main(["--ckpt", str(tmp_path / "none"), "--tokens", "1,2", "--top-p", "0"]) == 2
    assert "top_p=0.0" in capsys.readouterr().err
