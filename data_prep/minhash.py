"""MinHash signatures and LSH band keys over word shingles, vectorized with numpy.

A document's shingles are its lower-cased word `shingle`-grams (`data_prep.quality.words`); each
word is hashed once (crc32) and a shingle's hash combines its words' hashes into a mixed 64-bit
value `h`. The signature is, per permutation `i`, the minimum over the document's distinct
shingle hashes of the high 32 bits of `a_i * h + b_i` modulo 2**64 (`a_i` odd: multiply-shift
hashing; no division, several times cheaper than datasketch's `mod (2**61 - 1)`). Documents are
hashed in batches and shingles in blocks, so memory is set by the batch, never by one long document.

Band keys: the signature's first `bands * rows` values, `rows` per band, hashed to 64 bits with
the band's index mixed in, so equal keys mean (up to 64-bit collisions) an equal band.
"""

from __future__ import annotations

import zlib
from typing import List, Sequence

import numpy as np

from data_prep.quality import words

_MUL = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BLOCK = 1 << 14  # shingles per permutation block: (block x num_perm) uint64 at a time


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


class MinHasher:
    """Signatures of `num_perm` uint32 values per document; equal settings give equal signatures
    in every process (no per-process hash seed is involved)."""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        if num_perm < 1 or shingle < 1:
            raise ValueError(f"num_perm ({num_perm}) and shingle ({shingle}) must be >= 1")
        rng = np.random.RandomState(seed)
        # Odd multipliers make h -> a*h (mod 2**64) a bijection; its high bits depend on all of h.
        self.a = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64)
        self.num_perm, self.shingle = num_perm, shingle

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The 64-bit hashes of a text's word shingles (one shingle for a shorter text); a repeated
        shingle repeats its hash, which changes no minimum."""
        w = words(text)
        wh = np.fromiter(map(zlib.crc32, map(str.encode, w)), dtype=np.uint64, count=len(w))
        n = min(self.shingle, len(w)) or 1
        if not len(wh):
            wh = np.zeros(1, np.uint64)
        count = len(wh) - n + 1
        h = np.zeros(count, np.uint64)
        for k in range(n):
            h = (h * _MUL) ^ wh[k:k + count]
        return _mix(h)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures."""
        out = np.empty((len(texts), self.num_perm), np.uint32)
        for i, text in enumerate(texts):
            h = self.shingle_hashes(text)
            best = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
            for s in range(0, len(h), _BLOCK):
                block = h[s:s + _BLOCK, None] * self.a[None, :]
                block += self.b[None, :]
                np.minimum(best, block.min(axis=0), out=best)
            out[i] = (best >> np.uint64(32)).astype(np.uint32)
        return out


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys of the signatures' bands."""
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations; "
                         f"signatures have {sigs.shape[1]}")
    v = sigs[:, :bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
    h = np.broadcast_to((np.arange(bands, dtype=np.uint64) + np.uint64(1)) * _MUL, (len(sigs), bands)).copy()
    for j in range(rows):
        h = _mix(h ^ v[:, :, j])
    return h


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values, row by row."""
    return (np.asarray(a) == np.asarray(b)).mean(axis=-1)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Chance that two documents of this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def describe_bands(bands: int, rows: int, points: List[float] = (0.5, 0.7, 0.8, 0.9)) -> str:
    return ", ".join(f"P(candidate | J={j}) = {candidate_probability(j, bands, rows):.4f}" for j in points)
