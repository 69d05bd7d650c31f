"""Duplicate removal: exact (document hash) and near duplicates (MinHash + LSH banding), in numpy.

Exact: a document's key is the first 8 bytes of BLAKE2b over its UTF-8 text (chats: the rendered text); a
document whose key occurred earlier in the corpus order is an exact duplicate.

Near: MinHash over the document's token n-grams ("shingles", `ngram` consecutive token ids), `bands` x `rows`
hash functions, LSH banding (Broder 1997; Leskovec et al., "Mining of Massive Datasets", ch. 3): each band of
`rows` minimum values is hashed to one 64-bit key, and a document is a near duplicate if any of its band keys
occurred in an earlier document (kept or not, so a chain of near copies is one cluster of which the first
document stays: the rule of datatrove's MinHash stages that Huginn's tooling used). Two documents with Jaccard
similarity s collide with probability 1 - (1 - s^rows)^bands; the default 14 x 8 (Huginn / datatrove) gives
~0.92 at s = 0.8, ~0.57 at 0.7 and ~0.05 at 0.5. Candidates are not re-verified.

Why not a library: `datasketch` (the well-kept one) hashes every shingle with SHA-1 in a Python loop per
document, needs scipy, and keeps its LSH index in Python dicts; here shingles are hashed from the token ids the
tokenizer has just produced, vectorized per document (a few tens of microseconds per document), and the
corpus-wide decision is a sort (`np.unique`) over all band keys, 8 bytes per band and document. Hashes are
fixed functions of the seed (never Python's salted `hash`), so results do not depend on the process.
"""

from __future__ import annotations

import hashlib

import numpy as np

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer, elementwise on uint64 (a bijective bit mixer)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def text_hash(data: bytes) -> int:
    """64-bit key of a document's UTF-8 bytes (exact duplicates)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def uniform01(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded, uniform value in [0, 1) per uint64 key (used to draw the validation documents)."""
    mixed = splitmix64(np.asarray(keys, dtype=np.uint64) ^ splitmix64(np.uint64(seed % 2**64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


class MinHasher:
    """Band keys of token sequences: `band_keys(ids)` -> uint64 [bands]."""

    def __init__(
        self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 0, block: int = 8192
    ) -> None:
        if ngram < 1 or bands < 1 or rows < 1:
            raise ValueError("ngram, bands and rows must be >= 1")
        self.ngram, self.bands, self.rows, self.block = ngram, bands, rows, block
        rng = np.random.default_rng([seed, ngram, bands, rows])
        n = bands * rows
        # multiply-shift hashing: h_j(x) = high 32 bits of (a_j * x + b_j) mod 2^64, a_j odd
        self.a = (rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, n, dtype=np.uint64)
        self.salt = splitmix64(np.arange(bands, dtype=np.uint64) + np.uint64(seed))

    def shingles(self, ids: np.ndarray) -> np.ndarray:
        """One uint64 per window of `ngram` consecutive ids (the whole sequence if it is shorter)."""
        ids = np.asarray(ids, dtype=np.uint64)
        width = min(self.ngram, len(ids))
        count = len(ids) - width + 1
        h = np.zeros(max(count, 1), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(width):
                h = h * np.uint64(0x100000001B3) + ids[k : k + count] + np.uint64(1)
        return splitmix64(h)

    def signature(self, ids: np.ndarray) -> np.ndarray:
        """MinHash signature, uint64 [bands * rows] (values < 2^32)."""
        sh = self.shingles(ids)
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for s in range(0, len(sh), self.block):
                part = sh[s : s + self.block]
                values = (self.a[:, None] * part[None, :] + self.b[:, None]) >> np.uint64(32)
                np.minimum(sig, values.min(axis=1), out=sig)
        return sig

    def band_keys(self, ids: np.ndarray) -> np.ndarray:
        sig = self.signature(ids).reshape(self.bands, self.rows)
        key = self.salt.copy()
        with np.errstate(over="ignore"):
            for r in range(self.rows):
                key = splitmix64(key * np.uint64(0x100000001B3) + sig[:, r])
        return key


def earlier_occurrence(keys: np.ndarray) -> np.ndarray:
    """bool [n]: True where the same key occurs at a smaller index."""
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.zeros(0, dtype=bool)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)] < np.arange(len(keys))


EXACT, NEAR = 1, 2


def duplicate_codes(hashes: np.ndarray, bands: np.ndarray | None, exact: bool, near: bool) -> np.ndarray:
    """Per document in corpus order: 0 keep, `EXACT` (same text earlier), `NEAR` (shares an LSH band with an
    earlier document). `bands`: uint64 [n, bands] or None."""
    codes = np.zeros(len(hashes), dtype=np.int8)
    if near and bands is not None and bands.shape[1]:
        hit = np.zeros(len(hashes), dtype=bool)
        for b in range(bands.shape[1]):
            hit |= earlier_occurrence(bands[:, b])
        codes[hit] = NEAR
    if exact or near:  # an exact copy is also a near copy; report it as exact
        codes[earlier_occurrence(hashes)] = EXACT
    return codes
