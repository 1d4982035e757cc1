"""Quality filters: exact and near dedup, n-gram decontamination, length filters, the CLI report."""

import json
import random

import pytest

from data_prep.quality import Decontaminator, ExactDedup, NearDedup, length_reason, main

pytest.importorskip("datasketch")

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def essay(seed, n=120):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n))


def test_exact_dedup_keeps_first():
    d = ExactDedup()
    assert d.check("same text", "a:1") is None
    assert d.check("same text", "a:2") == "a:1"
    assert d.check("Same  TEXT", "a:3") is None
    n = ExactDedup(normalize=True)
    assert n.check("same text", "a:1") is None and n.check("Same \n TEXT", "a:2") == "a:1"


def test_near_dedup_finds_edited_copy_not_unrelated():
    base = essay(1)
    w = base.split()
    edited = " ".join(w[:60] + ["CHANGED"] + w[61:])  # one word of 120 replaced
    nd = NearDedup(threshold=0.8)
    assert nd.check(base, "f:1") is None
    assert nd.check(edited, "f:2") == "f:1"
    for s in range(2, 12):
        assert nd.check(essay(s), f"f:{s + 1}") is None


def test_decontamination_hits_13_grams():
    question = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
    dc = Decontaminator({"gsm8k": [question, "too short item"]}, n=13)
    assert dc.too_short == {"gsm8k": 1} and dc.items == {"gsm8k": 2}
    leaked = "Blog post. " + question.upper() + "! How many clips did she sell?"
    found = dc.check(leaked)
    # 20 words in the question -> 8 distinct 13-grams, all present despite case/punctuation changes.
    assert list(found) == ["gsm8k"] and len(found["gsm8k"]) == 8
    twelve = " ".join(question.split()[:12])
    assert dc.check(twelve + " unrelated ending words here") == {}
    assert dc.hits["gsm8k"].docs == 1 and dc.hits["gsm8k"].ngrams == 8


def test_length_filter():
    assert length_reason("abc", min_chars=5) == "shorter than 5 chars"
    assert length_reason("abcdef", max_chars=5) == "longer than 5 chars"
    assert length_reason("one two", min_words=3) == "fewer than 3 words"
    assert length_reason("one two three", min_chars=3, min_words=3, max_words=3) is None


def test_cli_pipeline_counts_and_report(tmp_path):
    question = " ".join(essay(99, 20).split())
    records = [{"text": essay(1)}, {"text": essay(1)}, {"text": essay(2)}, {"text": "tiny"},
               {"text": essay(3) + " " + question}, {"text": 5}]
    w = essay(2).split()
    records.append({"text": " ".join(w[:50] + ["EDIT"] + w[51:])})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    ev = tmp_path / "mytest.jsonl"
    ev.write_text(json.dumps({"question": question, "answer": "42"}) + "\n")
    out = tmp_path / "clean.jsonl"
    rc = main(["--input", str(src), "--output", str(out), "--min-chars", "10", "--exact-dedup",
               "--near-dedup", "--decontaminate", str(ev), "--eval-key", "question", "--eval-key", "answer"])
    assert rc == 0
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert kept == [essay(1), essay(2)]
    report = json.loads((tmp_path / "clean.jsonl.report.json").read_text())
    assert report["counts"] == {"records": 8, "kept": 2, "exact_dup": 1, "length": 1, "contaminated": 1,
                                "invalid:not_string": 1, "near_dup": 1, "invalid:malformed_json": 1}
    hits = report["decontamination"]["mytest"]  # the item is question + answer: 21 words, 9 grams; 8 leaked
    assert hits["docs_hit"] == 1 and hits["ngram_hits"] == 8
    removed = [json.loads(line) for line in (tmp_path / "clean.jsonl.removed.jsonl").read_text().splitlines()]
    assert [(r["line"], r["filter"]) for r in removed] == [
        (2, "exact_dup"), (4, "length"), (5, "contaminated"), (6, "invalid:not_string"), (7, "near_dup"),
        (8, "invalid:malformed_json")]
    assert removed[0]["detail"] == f"same text as {src}:1"


def test_cli_hostile_records_are_removed_not_fatal(tmp_path):
    """Records the reader refuses (too large, nested too deep, a damaged gzip) are listed as
    invalid:* with file:line; the others are filtered as usual."""
    import gzip

    good = [json.dumps({"text": essay(s)}) for s in range(3)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([good[0], "[" * 50_000, '{"text": "' + "x" * 300_000 + '"}', good[1]]) + "\n")
    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(gzip.compress((good[2] + "\n").encode() * 200, mtime=0)[:-20])
    out = tmp_path / "clean.jsonl"
    assert main(["--input", str(src), str(damaged), "--output", str(out), "--max-record-bytes", "100KiB"]) == 0
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert kept[:2] == [essay(0), essay(1)] and set(kept[2:]) == {essay(2)}
    removed = [json.loads(line) for line in (tmp_path / "clean.jsonl.removed.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["filter"]) for r in removed] == [
        (str(src), 2, "invalid:too_deep"), (str(src), 3, "invalid:too_large"),
        (str(damaged), len(kept) - 1, "invalid:corrupt_file")]
    # An eval set must be read whole: a record it cannot read is an error naming file:line.
    ev = tmp_path / "deep_eval.jsonl"
    ev.write_text(json.dumps({"text": "q"}) + "\n" + "[" * 50_000 + "\n")
    assert main(["--input", str(src), "--output", str(out), "--decontaminate", str(ev)]) == 1
