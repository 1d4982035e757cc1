"""Synthetic corpora: every record is verified, wrong answers/solutions are rejected, model
synthesis keeps exactly the completions the verifiers accept, and the output tokenizes."""

from __future__ import annotations

import json
import re
import threading
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import sympy

from data_prep.synth import backends, code_gen, math_gen
from data_prep.synth.__main__ import main as synth_main
from data_prep.verifiers import run_code_tests, verify_math


@pytest.mark.parametrize("kind", sorted(math_gen.KINDS))
def test_math_records_verified_and_reproducible(kind):
    recs = list(math_gen.generate(kind, 40, seed=7))
    assert len(recs) == 40
    for r in recs:
        assert verify_math(r["solution"], r["answer"]) and r["text"].startswith("Problem: ")
        assert {"domain", "kind", "source", "generator", "seed", "index", "id", "verified"} <= set(r)
        wrong = math_gen.latex(_parse_answer(r["answer"]) + 1)
        assert not verify_math(r["solution"], wrong)
    assert list(math_gen.generate(kind, 5, seed=7)) == recs[:5]
    assert list(math_gen.generate(kind, 5, seed=8)) != recs[:5]


def _parse_answer(latex: str) -> Fraction:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", latex)
    return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1) if m else Fraction(int(latex))


def test_arithmetic_answer_matches_the_printed_expression():
    # Independent of the generator: evaluate the problem statement itself with sympy.
    for r in math_gen.generate("arithmetic", 30, seed=1):
        expr = re.search(r"\$(.*)\$", r["problem"]).group(1).replace("\\times", "*")
        assert sympy.sympify(expr) == sympy.Rational(_parse_answer(r["answer"]))


def test_math_generator_bug_is_caught(monkeypatch):
    real = math_gen.KINDS["linear"]

    def off_by_one(rng):
        q, s, value, check = real(rng)
        return q, s.replace("\\boxed{", "\\boxed{1+"), value + 1, check  # consistent text, wrong math
    monkeypatch.setitem(math_gen.KINDS, "linear", off_by_one)
    assert list(math_gen.generate("linear", 10, seed=0)) == []


def test_code_records_pass_and_mutants_fail():
    recs = list(code_gen.generate(20, seed=3))
    assert len(recs) == 20 and len({r["kind"] for r in recs}) >= 5
    for r in recs[:6]:
        body = r["solution"].split("\n", 1)[1]
        mutant = r["solution"].replace(body, "    return None\n")
        assert not run_code_tests(mutant, r["tests"], timeout_s=5).all_passed, r["entry_point"]


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions server that solves linear equations, wrongly for odd samples."""

    def do_POST(self):  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        eq = re.search(r"\$(-?\d+)x ([+-]) (\d+) = (-?\d+)\$", body["prompt"])
        a, sign, b, c = int(eq.group(1)), eq.group(2), int(eq.group(3)), int(eq.group(4))
        x = Fraction(c - (b if sign == "+" else -b), a)
        choices = [{"index": i, "text": f" (try {i}) x = {x + (i % 2)}, so \\boxed{{{x + (i % 2)}}}"} for i in range(body["n"])]
        payload = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_backend_rejection_sampling(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        out = tmp_path / "model.jsonl"
        assert synth_main(["model", "--tasks", "math:linear", "--n", "6", "--base-url", url, "--model", "m",
                           "--samples", "4", "--out", str(out)]) == 0
    finally:
        server.shutdown()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6 * 2  # samples 0 and 2 are right; 1 and 3 are off by one
    assert all(r["index"] % 2 == 0 and r["source"] == "model" and r["generator"] == "openai:m" for r in recs)
    assert all(verify_math(r["completion"], t["answer"]) for r in recs
               for t in backends.math_tasks("linear", 6, 0) if t["id"] == r["task_id"])


def test_cli_programmatic_output_tokenizes(tmp_path):
    from data_prep.tokenize import main as tokenize_main

    assert synth_main(["programmatic", "--domain", "math", "--n", "10", "--out", str(tmp_path / "m.jsonl")]) == 0
    assert synth_main(["programmatic", "--domain", "code", "--n", "4", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert tokenize_main(["--input", str(tmp_path / "m.jsonl"), str(tmp_path / "c.jsonl"), "--output-prefix",
                          str(tmp_path / "tok"), "--tokenizer", "qwen3", "--quiet"]) == 0
    assert (tmp_path / "tok.bin").stat().st_size > 0
    assert synth_main(["model", "--tasks", "code", "--n", "1", "--out", str(tmp_path / "x.jsonl")]) == 2


def test_checkpoint_sampling_lives_with_the_runtime(tmp_path, capsys):
    """data_prep loads no models: `--ckpt` there names tools.synth, which is the same CLI plus
    the Megatron backend (its own test: tests/test_generate.py, MegatronBackend)."""
    rc = synth_main(["model", "--tasks", "math:linear", "--n", "1", "--ckpt", str(tmp_path / "c"),
                     "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "python -m tools.synth" in capsys.readouterr().err
    from tools import synth

    rc = synth.main(["model", "--tasks", "math:linear", "--n", "1", "--ckpt", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "missing" in capsys.readouterr().err  # reached the checkpoint reader
    assert not (tmp_path / "o.jsonl").exists()
