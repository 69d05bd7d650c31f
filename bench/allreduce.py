"""Gradient all-reduce bandwidth on 2 gloo processes (CPU): the chunked all-reduce against plain all_reduce.

The payload is a model-like list of fp32 gradients (≈65 MB: 5 blocks of qkv / out / fc / proj matrices, norms
and biases, plus an embedding). Methods, each timed as the median of `--iters` runs after one warm-up:
  per-tensor   one synchronous dist.all_reduce per tensor
  flat         one dist.all_reduce of a pre-flattened buffer (pure wire time; no flatten/unflatten copies)
  chunked      ChunkedAllReduce.all_reduce_ (copies in and out of the staging buffer included), several
               chunk sizes and wire dtypes; a 64 MB chunk sends 2 messages (128 MB) for ≈65 MB of payload.
Bandwidth = payload bytes (fp32 gradients) / time; ratios (speed-ups, >1 = faster) are against per-tensor
and flat within the same run.
Absolute numbers on a shared 2-core machine are noisy (±20 %).

    python bench/allreduce.py                # ≈30 s
    python bench/allreduce.py --iters 3 --blocks 2
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raven_titan.parallel.chunked_allreduce import ChunkedAllReduce, plan_chunks  # noqa: E402
from raven_titan.parallel.distributed import init_distributed, teardown  # noqa: E402

MB = 2**20
CHUNKED = [
    (1, torch.float32),
    (4, torch.float32),
    (16, torch.float32),
    (64, torch.float32),
    (4, torch.bfloat16),
]


def gradients(blocks: int, width: int = 512) -> list[torch.Tensor]:
    shapes = [(4 * width, width)]  # embedding
    for _ in range(blocks):
        shapes += [(3 * width, width), (width, width), (2 * 11 * width // 4, width), (width, 11 * width // 4)]
        shapes += [(width,), (width,), (width,)]
    return [torch.randn(s) for s in shapes]


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, port: int, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s=120)
    grads = gradients(args.blocks)
    payload = sum(g.nbytes for g in grads)
    flat = torch.cat([g.view(-1) for g in grads])

    def per_tensor():
        for g in grads:
            dist.all_reduce(g)

    methods = {
        "per-tensor": (per_tensor, len(grads), payload),
        "flat": (lambda: dist.all_reduce(flat), 1, payload),
    }
    for chunk_mb, wire in CHUNKED:
        reducer = ChunkedAllReduce(chunk_bytes=chunk_mb * MB, wire_dtype=wire)
        n = len(plan_chunks([g.numel() for g in grads], reducer.chunk_numel))
        name = f"chunked {chunk_mb} MB {str(wire).removeprefix('torch.')}"
        methods[name] = (lambda r=reducer: r.all_reduce_(grads, op="sum"), n, n * chunk_mb * MB)

    rows = []
    for name, (fn, messages, sent) in methods.items():
        rows.append((name, messages, sent, timed(fn, args.iters)))
    if rank == 0:
        base, flat_t = rows[0][3], rows[1][3]
        print(
            f"payload {payload / MB:.1f} MB in {len(grads)} fp32 tensors, 2 ranks, gloo, median of {args.iters}"
        )
        print(
            f"{'method':24s} {'msgs':>5s} {'sent MB':>8s} {'ms':>8s} {'GB/s':>7s} {'vs per-tensor':>14s} {'vs flat':>8s}"
        )
        for name, messages, sent, t in rows:
            print(
                f"{name:24s} {messages:5d} {sent / MB:8.1f} {t * 1e3:8.1f} {payload / t / 1e9:7.2f} {base / t:13.2f}x {flat_t / t:7.2f}x"
            )
    teardown(grads, methods, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--blocks", type=int, default=5, help="model blocks in the payload (12.25 MB each)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
