"""Chunked all-reduce (raven_titan.parallel.chunked_allreduce) on 2 gloo processes.

One spawn for the whole module: every distributed check runs in the same 2 processes, each check's outcome
is recorded per rank, and each check is its own (parametrized) test, so each can fail on its own.
"""

from __future__ import annotations

import json
import math
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raven_titan.parallel.chunked_allreduce import (
    ChunkedAllReduce,
    ChunkedDataParallel,
    broadcast_parameters,
    install_replicate_all_reduce_hooks,
    plan_chunks,
    reduce_replicate_gradients,
)
from raven_titan.parallel.distributed import init_distributed, teardown

WORLD = 2
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


class Recorder:
    """Wraps `dist.all_reduce` (the only collective the reducer uses): records a copy of every message as
    sent, and whether it was asynchronous."""

    def __enter__(self):
        self.real = dist.all_reduce
        self.messages: list[tuple[torch.Tensor, bool]] = []
        dist.all_reduce = self
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.real

    def __call__(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self.messages.append((tensor.clone(), async_op))
        return self.real(tensor, op=op, group=group, async_op=async_op)


def _data(rank: int, shapes, seed: int, wide: bool = True) -> list[torch.Tensor]:
    """Per-rank values; `wide` spreads magnitudes over 1e-3..1e3 so that any change in rounding shows."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=g)
        if wide:
            t *= 10.0 ** torch.randint(-3, 4, shape, generator=g)
        out.append(t)
    return out


# chunk of 4 KB = 1024 fp32 elements; totals below, at and above one chunk (tensors straddle boundaries)
CHUNK_BYTES = 4096
CASES = {
    "smaller": [(10, 7), (33,)],  # 103
    "equal": [(32, 16), (512,)],  # 1024
    "larger": [(700,), (30, 50), (3,), (2000,)],  # 4203: 5 messages, 700 + 1500 straddle boundaries
}


@check
def fp32_bit_identical_to_plain_all_reduce(rank):
    reducer = ChunkedAllReduce(chunk_bytes=CHUNK_BYTES)
    for seed, (case, shapes) in enumerate(CASES.items()):
        for op in ("sum", "avg"):
            ts = _data(rank, shapes, seed)
            plain_sum = [t.clone() for t in ts]
            plain_avg = [t.clone() for t in ts]
            if reducer._buffer is not None:
                reducer._buffer.fill_(float("nan"))  # stale memory must not leak into results
            reducer.all_reduce_(ts, op=op)
            for t in plain_sum:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            for t in plain_avg:
                dist.all_reduce(t, op=dist.ReduceOp.AVG)
            for i, (t, s, a) in enumerate(zip(ts, plain_sum, plain_avg)):
                assert t.dtype == torch.float32 and t.shape == s.shape
                if op == "sum":
                    assert torch.equal(t, s), f"{case}/{op} tensor {i} differs from all_reduce(SUM)"
                else:
                    assert torch.equal(t, s / WORLD), (
                        f"{case}/{op} tensor {i} differs from all_reduce(SUM)/ws"
                    )
                    assert torch.equal(t, a), f"{case}/{op} tensor {i} differs from all_reduce(AVG)"


@check
def every_message_has_chunk_size_and_zero_padding(rank):
    for wire, elem in ((torch.float32, 4), (torch.bfloat16, 2)):
        reducer = ChunkedAllReduce(chunk_bytes=CHUNK_BYTES, wire_dtype=wire)
        n = CHUNK_BYTES // elem
        assert reducer.chunk_numel == n
        # a big call first, so the small calls after it find stale values in the reused staging buffer
        for seed, case in enumerate(["larger", "smaller", "equal", "larger"]):
            ts = _data(rank, CASES[case], seed)
            total = sum(t.numel() for t in ts)
            if reducer._buffer is not None:
                reducer._buffer.fill_(123.0 + rank)
            with Recorder() as rec:
                reducer.all_reduce_(ts, op="sum")
            assert len(rec.messages) == math.ceil(total / n), (wire, case, len(rec.messages))
            for msg, async_op in rec.messages:
                assert msg.dtype == wire and msg.numel() == n and msg.nbytes == CHUNK_BYTES, (wire, case)
                assert not async_op
            used = total - (len(rec.messages) - 1) * n
            tail = rec.messages[-1][0][used:]
            assert (tail == 0).all(), f"{wire}/{case}: padding of the last message is not zeros"
            assert (reducer._buffer[used:] == 0).all(), "reduced padding is not zeros"


@check
def bf16_wire_close_to_fp32(rank):
    shapes = [(3000,), (40, 30)]  # 4200 elements: 3 bf16 messages of 2048
    ts = _data(rank, shapes, seed=7, wide=False)
    ref = [t.clone() for t in ts]
    scale = [t.abs() for t in ts]
    ChunkedAllReduce(chunk_bytes=CHUNK_BYTES, wire_dtype=torch.bfloat16).all_reduce_(ts, op="avg")
    for t in ref:
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    for t in scale:
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    for t, r, s in zip(ts, ref, scale):
        assert t.dtype == torch.float32
        err = (t - r).abs()
        # two bf16 roundings of inputs (2^-9 relative each) and one of the sum
        assert (err <= 2**-7 * s + 1e-30).all(), f"max bf16 error {err.max().item()}"
        assert not torch.equal(t, r), "bf16 wire gave exactly the fp32 result: is the wire really bf16?"


class _Net(nn.Module):
    def __init__(self, with_unused: bool = True):
        super().__init__()
        if with_unused:
            self.unused = nn.Linear(3, 3)  # never gets a gradient: must be reduced as zeros
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return self.body(x)


def _net(seed: int = 0, with_unused: bool = True) -> _Net:
    torch.manual_seed(seed)
    return _Net(with_unused)


def _batch(rank: int, step: int, micro: int) -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))


def _loss(model, x):
    return model(x).square().mean()


def _expected_grads(step: int, with_unused: bool = True) -> list[torch.Tensor]:
    """Average over ranks of the per-rank gradients (2 micro-batches each), computed here for every rank."""
    per_rank = []
    for r in range(WORLD):
        m = _net(with_unused=with_unused)
        for micro in range(2):
            _loss(m, _batch(r, step, micro)).backward()
        per_rank.append([torch.zeros_like(p) if p.grad is None else p.grad for p in m.parameters()])
    return [sum(gs) / WORLD for gs in zip(*per_rank)]


@check
def data_parallel_sync_and_overlap_match_average(rank):
    # 224 parameters in chunks of 32: every tensor but the biases straddles a chunk boundary
    sync_model, over_model = _net(seed=rank), _net(seed=rank)
    broadcast_parameters(sync_model, src=0)
    broadcast_parameters(over_model.parameters(), src=0)
    for a, b, ref in zip(sync_model.parameters(), over_model.parameters(), _net(seed=0).parameters()):
        assert torch.equal(a, ref) and torch.equal(b, ref), "broadcast_parameters did not copy rank 0"

    sync = ChunkedDataParallel(sync_model, ChunkedAllReduce(chunk_bytes=128))
    over = ChunkedDataParallel(over_model, ChunkedAllReduce(chunk_bytes=128), overlap=True)
    n_chunks = len(plan_chunks([p.numel() for p in over.params], 32))
    for step in range(2):  # the second step reuses the buffers and re-arms the hooks
        _loss(sync_model, _batch(rank, step, 0)).backward()
        _loss(sync_model, _batch(rank, step, 1)).backward()
        sync.reduce_gradients()

        with over.no_sync():
            _loss(over_model, _batch(rank, step, 0)).backward()
        with Recorder() as rec:
            _loss(over_model, _batch(rank, step, 1)).backward()
            during_backward = len(rec.messages)
            over.reduce_gradients()
        assert during_backward >= 1, "overlap mode sent nothing during backward"
        assert len(rec.messages) == n_chunks
        assert all(a and m.numel() == 32 for m, a in rec.messages)

        expected = _expected_grads(step)
        for i, (ps, po, e) in enumerate(zip(sync_model.parameters(), over_model.parameters(), expected)):
            assert torch.equal(ps.grad, e), f"step {step}: sync gradient {i} != average of per-rank gradients"
            assert torch.equal(po.grad, ps.grad), f"step {step}: overlapped gradient {i} != synchronous"
        assert not sync_model.unused.weight.grad.any()
        sync_model.zero_grad(set_to_none=True)
        over_model.zero_grad(set_to_none=True)
    over.close()


@check
def hsdp_replicate_dimension_matches_native(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    replicate = mesh.get_group("replicate")

    def sharded(on):
        m = _net(with_unused=False)
        for unit in (m.body[0], m.body[2], m):
            fully_shard(unit, mesh=on)
        return m

    native = sharded(mesh)  # FSDP2's own HSDP: reduce-scatter over "shard", all-reduce over "replicate"
    after, hooked = sharded(mesh["shard"]), sharded(mesh["shard"])  # FSDP2 on "shard"; "replicate" via us
    install_replicate_all_reduce_hooks(hooked, ChunkedAllReduce(replicate, chunk_bytes=128))

    for step in range(2):
        for model in (native, after, hooked):
            for micro in range(2):
                model.set_requires_gradient_sync(micro == 1)  # accumulate locally on the first micro-batch
                _loss(model, _batch(rank, step, micro)).backward()
        with Recorder() as rec:
            reduce_replicate_gradients(after, replicate, ChunkedAllReduce(replicate, chunk_bytes=128))
        assert len(rec.messages) == math.ceil(212 / 32) and all(m.numel() == 32 for m, _ in rec.messages)
        for i, (pn, pa, ph, e) in enumerate(
            zip(native.parameters(), after.parameters(), hooked.parameters(), _expected_grads(step, False))
        ):
            assert torch.equal(pa.grad.to_local(), pn.grad.to_local()), (
                f"after-backward grad {i} != native HSDP"
            )
            assert torch.equal(ph.grad.to_local(), pn.grad.to_local()), f"hooked grad {i} != native HSDP"
            assert torch.allclose(pn.grad.full_tensor(), e, rtol=1e-6, atol=1e-7), (
                f"native grad {i} != expected"
            )
        for model in (native, after, hooked):
            model.zero_grad(set_to_none=True)
    try:
        install_replicate_all_reduce_hooks(native, ChunkedAllReduce(replicate))
        raise AssertionError("hooks on native HSDP were accepted")
    except ValueError:
        pass


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s=60)
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn(rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunked_allreduce")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CHECKS))
def test_distributed(results, name):
    for rank, res in enumerate(results):
        assert res.get(name) == "ok", f"rank {rank}: {res.get(name, 'did not run')}"


def test_plan_chunks_covers_every_element_once():
    numels = [700, 1500, 3, 0, 2000]
    chunks = plan_chunks(numels, 1024)
    assert len(chunks) == math.ceil(sum(numels) / 1024)
    seen = [torch.zeros(n, dtype=torch.int) for n in numels]
    for c, chunk in enumerate(chunks):
        fill = sum(s.numel for s in chunk)
        assert fill == 1024 or c == len(chunks) - 1
        assert [s.offset for s in chunk] == [sum(s.numel for s in chunk[:k]) for k in range(len(chunk))]
        for s in chunk:
            seen[s.tensor][s.start : s.start + s.numel] += 1
    assert all((s == 1).all() for s in seen)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ChunkedAllReduce(wire_dtype=torch.float16)
    with pytest.raises(ValueError):
        ChunkedAllReduce(chunk_bytes=6, wire_dtype=torch.float32)
    with pytest.raises(ValueError):
        ChunkedAllReduce().all_reduce_([torch.zeros(3)], op="max")
    with pytest.raises(ValueError):
        ChunkedAllReduce().all_reduce_([torch.zeros(4, 4).t()])


def test_init_distributed_single_process_and_missing_rendezvous(monkeypatch):
    from raven_titan.errors import RavenError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("gloo").world_size == 1 and not dist.is_initialized()
    teardown({"x": 1}, [2])  # no process group: only collects garbage
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RavenError, match="MASTER_ADDR"):
        init_distributed("gloo")
