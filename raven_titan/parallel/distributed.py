"""Process-group start and stop, shared by every entry point and multi-process test.

`init_distributed` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
`teardown` is the shutdown recipe that avoids the random SIGABRT at exit seen with a DeviceMesh on gloo
(platform notes): drop every reference to objects that hold process groups, gc.collect(), barrier,
destroy_process_group.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from raven_titan.errors import RavenError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Start the default process group from torchrun's environment variables.

    backend: "gloo", "nccl", or None for nccl when CUDA is available, else gloo. With WORLD_SIZE unset or 1
    no process group is started (single-process runs need none). Calling it again once a group exists just
    returns the layout. Keep `timeout_s` short in tests: ranks that disagree on a collective hang until it.
    """
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size == 1:
        return DistInfo(0, 0, 1)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RavenError(
            f"WORLD_SIZE = {world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE yourself)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistInfo(rank, local_rank, world_size)


def teardown(*objects: object) -> None:
    """Release process-group holders, then shut the default process group down cleanly.

    Pass the objects that (directly or not) hold process groups: model, optimizer, DeviceMesh, state dicts.
    Containers (dict, list, set) are emptied so that what they hold can be freed. A function cannot delete
    its caller's variables: drop your own names first, e.g.

        state = {"model": model, "optimizer": optimizer, "mesh": mesh}
        del model, optimizer, mesh
        teardown(state)

    Safe to call without a process group (then it only collects garbage). If the barrier fails (a peer
    died), the group is still destroyed and the error re-raised.
    """
    for obj in objects:
        if isinstance(obj, dict | list | set):
            obj.clear()
    del objects
    gc.collect()
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
