"""Per-rank data loading: the training loader over a mixture of prepared splits (a stateful distributed batch
sampler + torchdata's StatefulDataLoader; the only module that imports torchdata), and validation batches.

Training order: `raven_titan.data.mixture` decides, for each global micro-batch of W x B rows, which source
and which of its rows fills each position; rank r takes positions r, r + W, r + 2W, ... (B of them). The
loader never ends: sources start new epochs (fresh permutations) on their own schedule.

Resume: the sampler's state is the mixture position `{"batches", "consumed"}`, the same on every rank. The
trainer keeps that position in its checkpointed TrainState (advanced with `Mixture.draw` as batches are
consumed, so prefetching does not matter) and hands it to `build_train_loader`; `loader.state_dict()` /
`load_state_dict()` also resume exactly, with or without worker processes.

Validation (`val_batches`): rows in file order 0, 1, 2, ..., truncated to a multiple of W x B and strided the
same way; every call yields the same batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from raven_titan.data.mixture import Mixture
from raven_titan.data.shards import PackedRows
from raven_titan.errors import RavenError


class MixedRows(Dataset):
    """The rows of several splits addressed as one range (split s's row i is `offsets[s] + i`); items are the
    stored rows (numpy, uint16/uint32)."""

    def __init__(self, splits: Sequence[PackedRows]) -> None:
        self.splits = list(splits)
        self.offsets = np.cumsum([0] + [len(s) for s in self.splits])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.splits[s].row(int(i - self.offsets[s]))

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        return [self[i] for i in indices]


class _BatchIterator(Iterator[list[int]]):
    """Yields this rank's batches (indices into MixedRows) from a mixture position on; its state is that
    position."""

    def __init__(self, sampler: MixtureSampler, position: dict) -> None:
        self.sampler = sampler
        self.position = position

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> list[int]:
        s = self.sampler
        src, ordinal, self.position = s.mixture.draw(self.position, s.batch_size * s.world_size)
        mine = slice(s.rank, None, s.world_size)
        rows = s.mixture.rows(src[mine], ordinal[mine])
        return (s.offsets[src[mine]] + rows).tolist()

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.tag(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = self.sampler.check_state(state)


class MixtureSampler(Sampler[list[int]]):
    """Batch sampler for one data-parallel rank; `state_dict` is the position of its latest iterator, and
    `load_state_dict` makes every later `iter()` start there."""

    def __init__(
        self, mixture: Mixture, offsets: np.ndarray, batch_size: int, rank: int, world_size: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.mixture = mixture
        self.offsets = np.asarray(offsets[:-1], dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._start = mixture.start()
        self._latest: _BatchIterator | None = None

    def __iter__(self) -> _BatchIterator:
        # every iter() starts at the loaded position: with worker processes the DataLoader may call it twice
        self._latest = _BatchIterator(self, self._start)
        return self._latest

    def tag(self, position: dict) -> dict[str, Any]:
        return {**position, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def check_state(self, state: dict[str, Any]) -> dict:
        """The position in a saved state. A rank's state is its own: the same mixture position read by another
        layout is fine (use the trainer's global position for that), but a per-rank state must stay per rank."""
        mine = {"rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}
        if any(state.get(k) != v for k, v in mine.items()):
            raise RavenError(
                f"loader state saved by rank {state.get('rank')} of {state.get('world_size')} with batch size "
                f"{state.get('batch_size')} loaded into rank {self.rank} of {self.world_size} with batch size "
                f"{self.batch_size}: load each rank's own state"
            )
        return {"batches": int(state["batches"]), "consumed": dict(state["consumed"])}

    def state_dict(self) -> dict[str, Any]:
        if self._latest is not None:
            return self._latest.state_dict()
        return self.tag(self._start)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start = self.check_state(state)
        self._latest = None


def to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, seq_len + 1] stored rows -> (input_ids, labels), each a LongTensor [B, seq_len]."""
    batch = torch.from_numpy(rows.astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class TrainLoader:
    """A StatefulDataLoader whose workers send each batch as one small numpy array of stored rows, turned into
    tensors here (about 5x the throughput of sending tensors through shared memory, bench/loader.py).
    Iterating yields `(input_ids, labels)`; `state_dict` / `load_state_dict` are the DataLoader's."""

    def __init__(self, loader: StatefulDataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return map(to_batch, self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def build_train_loader(
    splits: Sequence[PackedRows],
    mixture: Mixture,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    num_workers: int = 0,
    position: dict | None = None,
) -> TrainLoader:
    """Endless loader of `(input_ids, labels)` batches [local_batch_size, seq_len] (int64) for one rank,
    drawing from `splits` (one per mixture source, same order) from `position` (default: the start)."""
    rows = MixedRows(splits)
    sampler = MixtureSampler(mixture, rows.offsets, local_batch_size, dp_rank, dp_world_size)
    if position is not None:
        sampler.load_state_dict(sampler.tag(position))
    with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.13 deprecates
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        loader = StatefulDataLoader(
            rows,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=np.stack,
            persistent_workers=False,
        )
    return TrainLoader(loader)


def val_batches(
    rows: PackedRows, batch_size: int, rank: int, world_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation batches: rows in file order, truncated to a multiple of world_size x batch_size
    (at most world_size x batch_size - 1 rows unused), position j to rank j % world_size; at most
    `max_batches`. Every rank gets the same number of batches."""
    per_rank = len(rows) // (world_size * batch_size)
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for b in range(per_rank):
        first = b * batch_size * world_size + rank
        yield to_batch(np.stack([rows.row(first + i * world_size) for i in range(batch_size)]))
