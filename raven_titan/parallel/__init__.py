"""Process layout. This version trains in one process (CPU or one GPU); data parallelism plugs in here."""

from __future__ import annotations

import os

from raven_titan.errors import RavenError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(cfg) -> int:
    """Data-parallel ranks implied by the `[parallelism]` section and the launch (WORLD_SIZE)."""
    ws = world_size()
    shard = cfg.data_parallel_shard_degree
    if shard == -1:
        if ws % cfg.data_parallel_replicate_degree:
            raise RavenError(
                f"parallelism.data_parallel_replicate_degree = {cfg.data_parallel_replicate_degree} does not "
                f"divide the world size {ws}; choose a divisor"
            )
        shard = ws // cfg.data_parallel_replicate_degree
    if shard < 1 or shard * cfg.data_parallel_replicate_degree != ws:
        raise RavenError(
            f"parallelism: shard degree {shard} x replicate degree {cfg.data_parallel_replicate_degree} "
            f"!= world size {ws}; set data_parallel_shard_degree = -1 to use all ranks"
        )
    return shard * cfg.data_parallel_replicate_degree


def check_single_process() -> None:
    if world_size() > 1:
        raise RavenError(
            f"WORLD_SIZE = {world_size()}: multi-process training is not implemented in this version; "
            "run with NGPU=1"
        )
