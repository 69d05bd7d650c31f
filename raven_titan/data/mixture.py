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
- **Row of a source:** the c-th row a source contributes is row `order(c div N)[c mod N]` of its N rows, where
  `order(e)` is numpy's shuffle of 0..N-1 seeded by (seed, source name, e): epoch after epoch, a fresh
  permutation. So every row of a source is read exactly once per epoch of that source, over all ranks
  together, for any world size (no row is dropped at epoch ends). An order costs 4 bytes per row (8 above
  2^32 rows) in the process that samples, e.g. 0.8 GB and ~9 s to shuffle for a 200M-row source at each of its
  epoch starts; only the current epoch's order is kept. (A keyed Feistel permutation would need no memory, but
  on the default run its orders gave a clearly larger spread of validation losses than numpy's shuffles.)

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


def name_key(name: str) -> int:
    """A stable 63-bit integer for a source name (part of its shuffling seed)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def epoch_order(num_rows: int, seed: int, name: str, epoch: int) -> np.ndarray:
    """The order in which a source's rows are read in one of its epochs: a permutation of 0..num_rows-1."""
    order = np.arange(num_rows, dtype=np.uint32 if num_rows <= 2**32 else np.int64)
    np.random.default_rng([seed, name_key(name), epoch]).shuffle(order)
    return order


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
        self._orders: dict[tuple[int, int], np.ndarray] = {}

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
                out[sel] = self._order(int(s), int(e))[ordinal[sel] % n]
        return out

    def _order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._orders:
            for old in [k for k in self._orders if k[0] == s and k[1] < epoch]:
                del self._orders[old]  # epochs are read in increasing order: keep only the newest
            self._orders[key] = epoch_order(self.sources[s].num_rows, self.seed, self.names[s], epoch)
        return self._orders[key]
