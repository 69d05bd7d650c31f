"""Per-rank data loader over a prepared split: a stateful distributed batch sampler + torchdata's
StatefulDataLoader (the only module that imports torchdata).

Order of rows (training, `infinite=True`): epoch e permutes all N rows with numpy's PCG64 seeded by (seed, e),
the same permutation on every rank (no communication; unlike Huginn's loader, spec section 8.3, whose per-rank
seeds made the file->rank assignment overlap). The permutation is truncated to a multiple of
W x B (W = data-parallel ranks, B = local batch size), dropping at most W x B - 1 rows per epoch (different
rows each epoch), and rank r takes positions r, r + W, r + 2W, ... in batches of B. So within an epoch every
row is used at most once over all ranks, and all ranks get the same number of full batches. After the last
batch of epoch e, epoch e + 1 starts with a fresh permutation; the loader never ends.

Validation (`infinite=False`): rows in file order 0, 1, 2, ... (no shuffling), truncated and strided the same
way; one pass, and every new `iter()` starts again from the first batch (so every evaluation sees the same
batches).

Resume: `loader.state_dict()` holds (epoch, batches already taken in that epoch) of this rank; loading it
into a loader built with the same arguments continues exactly where the saved one stopped (also with worker
processes). The state is plain ints, per rank: store it under a rank-specific key.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from raven_titan.data.shards import PackedRows
from raven_titan.errors import RavenError


class _BatchIterator(Iterator[list[int]]):
    """Yields this rank's batches of row indices from (epoch, batch) on; its state is that position."""

    def __init__(self, sampler: DistributedRowSampler, epoch: int, batch: int) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.batch = batch
        self._indices: np.ndarray | None = None

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> list[int]:
        s = self.sampler
        if self.batch >= s.batches_per_epoch:
            if not s.infinite:
                raise StopIteration
            self.epoch, self.batch, self._indices = self.epoch + 1, 0, None
        if self._indices is None:
            self._indices = s.rank_indices(self.epoch)
        b = s.batch_size
        out = self._indices[self.batch * b : (self.batch + 1) * b].tolist()
        self.batch += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, **self.sampler.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = self.sampler.check_state(state)
        self._indices = None


class DistributedRowSampler(Sampler[list[int]]):
    """Batch sampler for one data-parallel rank (see the module docstring for the order). Stateful: its
    `state_dict` is the position of its latest iterator; `load_state_dict` makes the next `iter()` resume
    there."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        infinite: bool,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.infinite = infinite
        self.batches_per_epoch = num_rows // (world_size * batch_size)
        self._resume: tuple[int, int] | None = None
        self._latest: _BatchIterator | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's row indices for `epoch`, in order (batches_per_epoch x batch_size of them)."""
        used = self.batches_per_epoch * self.batch_size * self.world_size
        if self.infinite:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        return order[self.rank : used : self.world_size].copy()

    def __iter__(self) -> _BatchIterator:
        epoch, batch = self._resume or (0, 0)
        self._resume = None
        self._latest = _BatchIterator(self, epoch, batch)
        return self._latest

    def identity(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "infinite": self.infinite,
        }

    def check_state(self, state: dict[str, Any]) -> tuple[int, int]:
        saved = {k: state.get(k) for k in self.identity()}
        if saved != self.identity():
            diff = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self.identity().items() if saved[k] != v)
            raise RavenError(
                f"cannot resume the data loader exactly: its state was saved with other settings ({diff}); "
                "resume with the same data, batch size, data-parallel layout and seed, or skip the loader "
                "state"
            )
        return int(state["epoch"]), int(state["batch"])

    def state_dict(self) -> dict[str, Any]:
        if self._latest is not None:
            return self._latest.state_dict()
        epoch, batch = self._resume or (0, 0)
        return {"epoch": epoch, "batch": batch, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = self.check_state(state)
        self._latest = None


def collate_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] rows of seq_len + 1 tokens -> (input_ids, labels), each a LongTensor [B, seq_len]."""
    batch = torch.stack(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def build_dataloader(
    dataset_folder: Path,
    split: str,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    seed: int,
    num_workers: int,
    infinite: bool,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """Loader over `dataset_folder/split` for one data-parallel rank, yielding `(input_ids, labels)` batches
    of shape [local_batch_size, seq_len] (int64). `infinite=True`: shuffled epochs without end (training);
    `infinite=False`: one pass in file order (validation)."""
    rows = PackedRows(Path(dataset_folder) / split)
    sampler = DistributedRowSampler(len(rows), local_batch_size, dp_rank, dp_world_size, seed, infinite)
    if sampler.batches_per_epoch == 0:
        raise RavenError(
            f"{rows.split_dir} has {len(rows)} rows, fewer than one global batch "
            f"({dp_world_size} ranks x {local_batch_size} rows); lower training.local_batch_size or add data"
        )
    with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.13 deprecates
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(
            rows,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_rows,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
