"""A synthetic corpus with planted near-duplicates, to measure deduplication.

`write_planted_corpus(path, n_docs)` writes `{"text", "id"}` jsonl: about 65% original documents
(paragraphs of words drawn from a Zipf-like vocabulary), 30% planted copies of an original
(`exact`, `edit1`/`edit5`/`edit10`/`edit20`: that percentage of words replaced, `shuffled`:
paragraphs reordered), 5% `partial` documents that share half an original's paragraphs and must
be kept, all in shuffled order. It returns the truth: `{"pairs": [(copy_id, original_id, kind)]}`.
`score()` turns a removed set into precision and recall per kind.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

KINDS = ("exact", "edit1", "edit5", "edit10", "edit20", "shuffled")
TARGET_KINDS = ("exact", "edit1", "shuffled")  # near-identical: must be removed at threshold 0.8


def _vocab(rng: random.Random, n: int = 20000) -> List[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) + str(i % 7) for i in range(n)]


def _paragraph(rng: random.Random, vocab: List[str]) -> str:
    n = rng.randint(30, 80)
    # Zipf-like: small indices far more likely, as in real text.
    return " ".join(vocab[min(int(rng.paretovariate(1.0)) - 1, len(vocab) - 1) if rng.random() < 0.5
                          else rng.randrange(len(vocab))] for _ in range(n))


def _edit(rng: random.Random, text: str, vocab: List[str], pct: int) -> str:
    paras = [p.split(" ") for p in text.split("\n\n")]
    slots = [(i, j) for i, p in enumerate(paras) for j in range(len(p))]
    for i, j in rng.sample(slots, max(1, len(slots) * pct // 100)):
        paras[i][j] = rng.choice(vocab)
    return "\n\n".join(" ".join(p) for p in paras)


def _copy(rng: random.Random, text: str, vocab: List[str], kind: str) -> str:
    if kind == "exact":
        return text
    if kind == "shuffled":
        paras = text.split("\n\n")
        while len(paras) > 1 and paras == text.split("\n\n"):
            rng.shuffle(paras)
        return "\n\n".join(paras)
    return _edit(rng, text, vocab, int(kind[4:]))


def write_planted_corpus(path: Path, n_docs: int, seed: int = 0) -> Dict[str, list]:
    rng = random.Random(seed)
    vocab = _vocab(rng)
    n_copies, n_partial = int(n_docs * 0.30), int(n_docs * 0.05)
    n_orig = n_docs - n_copies - n_partial
    docs = ["\n\n".join(_paragraph(rng, vocab) for _ in range(rng.randint(4, 8))) for _ in range(n_orig)]
    pairs: List[Tuple[int, int, str]] = []
    for k in range(n_copies):
        orig, kind = rng.randrange(n_orig), KINDS[k % len(KINDS)]
        pairs.append((len(docs), orig, kind))
        docs.append(_copy(rng, docs[orig], vocab, kind))
    for _ in range(n_partial):
        orig = rng.randrange(n_orig)
        paras = docs[orig].split("\n\n")
        keep = paras[:max(1, len(paras) // 2)]
        pairs.append((len(docs), orig, "partial"))
        docs.append("\n\n".join(keep + [_paragraph(rng, vocab) for _ in range(len(paras) - len(keep))]))
    order = list(range(len(docs)))
    rng.shuffle(order)
    with open(path, "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"text": docs[i], "id": i}) + "\n")
    return {"pairs": pairs, "docs": len(docs)}


def _groups(pairs: Iterable[Tuple[int, int]]) -> Dict[int, int]:
    """Document -> smallest member of its connected group."""
    pairs, parent = list(pairs), {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for pair in pairs for x in pair}


def score(truth: Dict[str, list], removed: Iterable[Tuple[int, int]]) -> Dict[str, float]:
    """`removed`: (removed document id, id of the document it duplicates). Precision: removed
    documents whose duplicate belongs to the same planted group (copies of one original, partial
    documents excluded); recall per kind: pairs whose two documents ended up in one group of
    removed -> duplicate links (one of them removed because of the other, directly or not)."""
    removed = list(removed)
    planted = _groups((c, o) for c, o, k in truth["pairs"] if k != "partial")
    found = _groups(removed)
    tp = sum(1 for d, dup in removed if d in planted and planted.get(dup) == planted[d])
    out = {"removed": len(removed), "precision": tp / max(len(removed), 1)}
    by_kind: Dict[str, List[bool]] = {}
    for c, o, k in truth["pairs"]:
        by_kind.setdefault(k, []).append(c in found and found.get(o) == found[c])
    for k, hits in by_kind.items():
        out[f"recall_{k}" if k != "partial" else "partial_removed"] = sum(hits) / len(hits)
    targets = [h for k in TARGET_KINDS for h in by_kind.get(k, [])]
    out["recall_target"] = sum(targets) / max(len(targets), 1)
    every = [h for k in KINDS for h in by_kind.get(k, [])]
    out["recall_all"] = sum(every) / max(len(every), 1)
    return out
