"""Process layout: how the world of ranks splits into the data-parallel dimensions of `[parallelism]`."""

from __future__ import annotations

import os

from raven_titan.errors import RavenError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def mesh_shape(cfg, ws: int | None = None) -> tuple[int, int]:
    """(replicate, shard) degrees for `ws` ranks (default: WORLD_SIZE), with -1 entries filled in."""
    ws = world_size() if ws is None else ws
    rep, shard = cfg.data_parallel_replicate_degree, cfg.data_parallel_shard_degree
    if cfg.data_parallel_mode == "chunked":
        if shard not in (-1, 1):
            raise RavenError(
                f"parallelism.data_parallel_shard_degree = {shard} with data_parallel_mode = 'chunked': "
                "chunked data parallel replicates parameters; set the shard degree to 1 (or -1), or use 'fsdp'"
            )
        shard = 1
    if rep == -1 and shard == -1:
        rep = ws if cfg.data_parallel_mode == "chunked" else 1
    if rep == -1:
        rep = ws // shard if shard > 0 and ws % shard == 0 else -1
    if shard == -1:
        shard = ws // rep if rep > 0 and ws % rep == 0 else -1
    if rep < 1 or shard < 1 or rep * shard != ws:
        raise RavenError(
            f"parallelism: replicate degree {cfg.data_parallel_replicate_degree} x shard degree "
            f"{cfg.data_parallel_shard_degree} does not fit the world size {ws}; set one of them to -1"
        )
    return rep, shard


def data_parallel_size(cfg) -> int:
    """Data-parallel ranks implied by the `[parallelism]` section and the launch (WORLD_SIZE)."""
    rep, shard = mesh_shape(cfg)
    return rep * shard
