"""Weighted mixtures of prepared datasets and the order in which training reads their rows.

A run reads a stream of rows, one global micro-batch (W ranks x B rows) at a time; position j of global
micro-batch g goes to rank j % W. Which source fills each position, and which of its rows, is a pure function
of the seed and the mixture's *position* (`batches` drawn so far, rows `consumed` per source). Every rank
computes the same draw, so nothing is communicated, and the position is global: a run resumes from it with
any number of ranks or any batch size.

- **Source of a position:** uniform draws from `default_rng([seed, MIX_STREAM, g])` against the weights of
  the sources that still have rows left (a source with `epochs` set stops after floor(epochs x rows) rows;
  its share then goes to the others in proportion to their weights). Over many draws each source's share of
  the rows approaches its normalised weight.
- **Row of a source:** the c-th row a source contributes is row `permute(c mod N, N, key(seed, name, c div N))`
  of its N rows: epoch after epoch, a fresh permutation. So every row of a source is read exactly once per
  epoch of that source, over all ranks together, for any world size (no row is dropped at epoch ends).
  The permutation is a keyed Feistel network with cycle walking: O(1) memory however many rows a source has
  (a 200M-row corpus needs no 1.6 GB index array per rank), computed only for the rows a rank reads.

Keys depend on the source's *name*, not its place in the list: adding or reordering sources leaves the
others' orders unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from raven_titan.errors import RavenError

MIX_STREAM = 0x6D6978  # "mix": separates the mixture's random stream from others seeded by the run seed
FEISTEL_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a cheap, well-mixing bijection of uint64 values."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _round_keys(key: str) -> np.ndarray:
    digest = hashlib.sha512(key.encode()).digest()  # 8 independent 64-bit words
    return np.frombuffer(digest[: 8 * FEISTEL_ROUNDS], dtype="<u8").astype(np.uint64)


def permute(index: np.ndarray, n: int, key: str) -> np.ndarray:
    """The images of `index` (ints in [0, n)) under a pseudo-random permutation of [0, n) chosen by `key`.

    A balanced Feistel network on 2h bits (4^h >= n, so the domain is < 4n) is a permutation of [0, 4^h);
    cycle walking (re-encrypting values >= n) restricts it to a permutation of [0, n)."""
    if n < 1:
        raise ValueError(f"cannot permute an empty range (n = {n})")
    half = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _round_keys(key)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_splitmix(right ^ k) & mask)
        return (left << shift) | right

    out = encrypt(np.asarray(index, dtype=np.uint64))
    walk = out >= n
    while walk.any():
        out[walk] = encrypt(out[walk])
        walk = out >= n
    return out.astype(np.int64)


@dataclass(frozen=True)
class Source:
    """One source of a mixture: `num_rows` packed rows, drawn with `weight`, at most `epochs` passes (None:
    no limit)."""

    name: str
    num_rows: int
    weight: float
    epochs: float | None = None

    @property
    def cap(self) -> float:
        return math.inf if self.epochs is None else math.floor(self.epochs * self.num_rows)


class Mixture:
    """The draw of rows from weighted sources (see the module docstring). Positions are dicts
    `{"batches": g, "consumed": {name: rows}}` (JSON-able; what a checkpoint stores)."""

    def __init__(self, sources: list[Source], seed: int) -> None:
        if not sources:
            raise ValueError("a mixture needs at least one source")
        for s in sources:
            if s.num_rows < 1 or not s.weight > 0:
                raise ValueError(f"source {s.name!r}: needs rows and a positive weight")
        self.sources = sources
        self.seed = seed
        self.names = [s.name for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.caps = np.array([s.cap for s in sources], dtype=np.float64)

    def start(self) -> dict:
        return {"batches": 0, "consumed": {name: 0 for name in self.names}}

    def _consumed(self, position: dict) -> np.ndarray:
        return np.array([int(position["consumed"].get(n, 0)) for n in self.names], dtype=np.int64)

    def remaining(self, position: dict) -> float:
        """Rows left before every source has hit its epochs limit (inf when one has none)."""
        return float(np.sum(self.caps - np.minimum(self._consumed(position), self.caps)))

    def draw(self, position: dict, count: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Fill the `count` positions of the next global micro-batch: (source index [count], ordinal of the
        row within its source's stream [count], the position after it)."""
        consumed = self._consumed(position)
        u = np.random.default_rng([self.seed, MIX_STREAM, int(position["batches"])]).random(count)
        src = np.empty(count, dtype=np.int64)
        ordinal = np.empty(count, dtype=np.int64)
        start = 0
        while start < count:
            room = self.caps - consumed
            active = room > 0
            if not active.any():
                total = int(consumed.sum())
                raise RavenError(
                    f"every data source reached its epochs limit after {total} rows; raise "
                    "data.sources[].epochs (or remove it) or lower training.steps"
                )
            cdf = np.cumsum(np.where(active, self.weights, 0.0))
            choice = np.searchsorted(cdf / cdf[-1], u[start:], side="right")
            choice[choice >= len(cdf)] = np.flatnonzero(active)[-1]  # u just below 1 vs a rounded cdf
            stop = len(choice)
            for s in np.flatnonzero(active):  # cut the chunk where a source would overflow its cap
                hits = np.flatnonzero(choice == s)
                if len(hits) > room[s]:
                    stop = min(stop, int(hits[int(room[s])]))
            for s in np.unique(choice[:stop]):
                hits = np.flatnonzero(choice[:stop] == s)
                src[start + hits] = s
                ordinal[start + hits] = consumed[s] + np.arange(len(hits))
                consumed[s] += len(hits)
            start += stop
        after = {
            "batches": int(position["batches"]) + 1,
            "consumed": dict(position["consumed"]) | {n: int(c) for n, c in zip(self.names, consumed)},
        }
        return src, ordinal, after

    def rows(self, src: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
        """Row index within its source for each (source, ordinal)."""
        out = np.empty(len(src), dtype=np.int64)
        for s in np.unique(src):
            n = self.sources[s].num_rows
            mine = np.flatnonzero(src == s)
            epochs = ordinal[mine] // n
            for e in np.unique(epochs):
                sel = mine[epochs == e]
                out[sel] = permute(ordinal[sel] % n, n, f"{self.seed}/{self.names[s]}/{int(e)}")
        return out
