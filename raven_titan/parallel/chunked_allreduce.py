"""Chunked all-reduce: gradients reduced in fixed-size messages (Huginn's `_allreduce_chunk_stream`, spec §6.2).

Tensors are walked in order and packed into a staging buffer of exactly `chunk_bytes` (default 64 MB, as in
Huginn), a tensor being split across consecutive chunks when it does not fit. Each full buffer is all-reduced
(SUM) as one message; the last, partial chunk is padded with zeros (the original sent stale memory) and sent
at full size, so every message has the same number of bytes. The wire dtype is fp32 or bf16.

Three ways to use it:
- `ChunkedAllReduce.all_reduce_(tensors)`: the primitive, in place on a list of tensors.
- `ChunkedDataParallel`: data parallelism with replicated parameters (Huginn's "simple-ddp"): gradients are
  reduced after backward, or, with `overlap=True`, chunks are sent asynchronously during backward as soon as
  the gradients that fill them exist.
- HSDP's replicate dimension: FSDP2 (`fully_shard`) on the *shard* sub-mesh only, and the replicate-dimension
  reduction of the sharded gradients done by us, either after backward (`reduce_replicate_gradients`) or inside
  backward through FSDP2's all-reduce hook (`install_replicate_all_reduce_hooks`). FSDP2's native HSDP
  (a 2-D mesh) cannot route its replicate all-reduce through us: its hook runs *after* its own all-reduce,
  and `set_requires_all_reduce(False)` keeps the partial gradients inside FSDP (`.grad` stays None).

All ranks of the group must call with the same sequence of tensor sizes; the reduction is elementwise, so with
a fp32 wire the result is bit-identical to one plain `dist.all_reduce` of each tensor (for 2 ranks always;
for more ranks as far as the backend sums every element in the same rank order regardless of message layout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

DEFAULT_CHUNK_BYTES = 64 * 2**20
WIRE_DTYPES = (torch.float32, torch.bfloat16)


class Segment(NamedTuple):
    """A contiguous piece of one tensor inside one chunk."""

    tensor: int  # index into the tensor list
    start: int  # offset in the flattened tensor
    offset: int  # offset in the chunk
    numel: int


def plan_chunks(numels: Sequence[int], chunk_numel: int) -> list[list[Segment]]:
    """Lay tensors of the given sizes end to end and cut the sequence into chunks of `chunk_numel` elements.
    Returns the segments of each chunk; only the last chunk may be partial."""
    chunks: list[list[Segment]] = []
    current: list[Segment] = []
    fill = 0
    for i, n in enumerate(numels):
        start = 0
        while start < n:
            take = min(n - start, chunk_numel - fill)
            current.append(Segment(i, start, fill, take))
            start += take
            fill += take
            if fill == chunk_numel:
                chunks.append(current)
                current, fill = [], 0
    if current:
        chunks.append(current)
    return chunks


def _flat(t: Tensor) -> Tensor:
    if not t.is_contiguous():
        raise ValueError(
            f"chunked all-reduce needs contiguous tensors (got shape {tuple(t.shape)}, strides {t.stride()})"
        )
    return t.view(-1)


class ChunkedAllReduce:
    """All-reduce of a list of tensors in messages of exactly `chunk_bytes` bytes of `wire_dtype`."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        wire_dtype: torch.dtype = torch.float32,
    ) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype}")
        elem = torch.finfo(wire_dtype).bits // 8
        if chunk_bytes < elem or chunk_bytes % elem:
            raise ValueError(
                f"chunk_bytes = {chunk_bytes} must be a positive multiple of {elem} ({wire_dtype})"
            )
        self.group = group
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = wire_dtype
        self.chunk_numel = chunk_bytes // elem
        self._buffer: Tensor | None = None  # the reusable staging buffer of the synchronous path

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def new_buffer(self, device: torch.device) -> Tensor:
        return torch.empty(self.chunk_numel, dtype=self.wire_dtype, device=device)

    def all_reduce_(self, tensors: Sequence[Tensor], op: str = "avg") -> None:
        """Reduce `tensors` in place across the group: op "sum" or "avg" (sum, then divide by the world size in
        each tensor's own dtype, exactly as `all_reduce(SUM)` followed by `div_(world_size)`)."""
        _check_op(op)
        flats = [_flat(t) for t in tensors]
        if not flats:
            return
        device = flats[0].device
        if self._buffer is None or self._buffer.device != device:
            self._buffer = self.new_buffer(device)
        for chunk in plan_chunks([f.numel() for f in flats], self.chunk_numel):
            for s in chunk:
                self._buffer[s.offset : s.offset + s.numel].copy_(
                    flats[s.tensor][s.start : s.start + s.numel]
                )
            self.send(self._buffer, chunk)
            self.unpack(self._buffer, chunk, flats, op)

    def send(self, buffer: Tensor, chunk: list[Segment], async_op: bool = False):
        """Zero the unused tail of a packed buffer and all-reduce (SUM) it at full size."""
        buffer[chunk[-1].offset + chunk[-1].numel :].zero_()
        return dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def unpack(self, buffer: Tensor, chunk: list[Segment], flats: Sequence[Tensor], op: str) -> None:
        """Copy a reduced buffer back into the tensors' slices (cast to their dtype; divided for "avg")."""
        world_size = self.world_size
        for s in chunk:
            dst = flats[s.tensor][s.start : s.start + s.numel]
            dst.copy_(buffer[s.offset : s.offset + s.numel])
            if op == "avg":
                dst.div_(world_size)


def _check_op(op: str) -> None:
    if op not in ("sum", "avg"):
        raise ValueError(f'op must be "sum" or "avg", got {op!r}')


def _unique(params: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    if isinstance(params, nn.Module):
        params = params.parameters()
    return list(dict.fromkeys(params))  # a tied weight counts once


def _trainable(params: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    return [p for p in _unique(params) if p.requires_grad]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t  # to_local() is a view: in-place writes go through


class ChunkedDataParallel:
    """Data parallelism over replicated parameters with chunked gradient averaging.

    Call `reduce_gradients()` after the last backward of a step (before clipping and the optimizer step).
    Parameters that got no gradient are reduced as zeros (their `.grad` is set).

    overlap=False: the reduction runs after backward, synchronously (exactly Huginn's behaviour).
    overlap=True: a post-accumulate-grad hook on every parameter copies its gradient into its chunk(s) as
    soon as it exists, and a chunk is sent (`async_op=True`) once all its gradients are in; `reduce_gradients()`
    then packs what is missing, waits for every message and writes the averages back. Chunks are laid out in
    parameter order (as in the synchronous path and in Huginn: same chunks, bit-identical results), but sent
    in *reverse* chunk order, the order in which backward produces gradients (last layers first). A chunk that
    completes early waits until every chunk after it has been sent, so all ranks issue the same sequence of
    collectives whatever the timing of their hooks. Costs one extra gradient-sized set of wire buffers.
    For gradient accumulation, run all but the last backward of a step under `no_sync()`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | nn.Module,
        reducer: ChunkedAllReduce | None = None,
        *,
        overlap: bool = False,
    ) -> None:
        self.params = _trainable(params)
        self.reducer = reducer or ChunkedAllReduce()
        self.overlap = overlap
        self._sync = True
        self._hooks = []
        if not overlap:
            return
        self._chunks = plan_chunks([p.numel() for p in self.params], self.reducer.chunk_numel)
        self._segments: list[list[tuple[int, Segment]]] = [[] for _ in self.params]
        for c, chunk in enumerate(self._chunks):
            for s in chunk:
                self._segments[s.tensor].append((c, s))
        self._buffers: list[Tensor] = []
        self._reset()
        for i, p in enumerate(self.params):
            self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self._on_grad(i, p)))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this context."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def reduce_gradients(self) -> None:
        """Average every parameter's gradient over the group (in overlap mode: finish the in-flight reduction)."""
        if self.overlap:
            self._finish()
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reducer.all_reduce_([p.grad for p in self.params], op="avg")

    def close(self) -> None:
        """Remove the hooks of the overlap mode."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # overlap mode

    def _reset(self) -> None:
        self._missing = [len(chunk) for chunk in self._chunks]  # segments not packed yet, per chunk
        self._packed = [False] * len(self.params)
        self._sent = 0  # chunks sent this step, in reverse chunk order
        self._works: list[tuple[int, dist.Work]] = []

    def _on_grad(self, i: int, p: Tensor) -> None:
        if not self._sync:
            return
        if self._packed[i]:
            raise RuntimeError(
                f"parameter {i} (shape {tuple(p.shape)}) got a second gradient before reduce_gradients(): "
                "run all but the last backward of a step under no_sync()"
            )
        self._pack(i, p.grad)
        self._send_ready()

    def _pack(self, i: int, grad: Tensor | None) -> None:
        if not self._buffers:
            self._buffers = [self.reducer.new_buffer(self.params[0].device) for _ in self._chunks]
        flat = None if grad is None else _flat(grad)
        for c, s in self._segments[i]:
            dst = self._buffers[c][s.offset : s.offset + s.numel]
            if flat is None:
                dst.zero_()
            else:
                dst.copy_(flat[s.start : s.start + s.numel])
            self._missing[c] -= 1
        self._packed[i] = True

    def _send_ready(self) -> None:
        n = len(self._chunks)
        while self._sent < n and self._missing[n - 1 - self._sent] == 0:
            c = n - 1 - self._sent
            self._works.append((c, self.reducer.send(self._buffers[c], self._chunks[c], async_op=True)))
            self._sent += 1

    def _finish(self) -> None:
        for i, p in enumerate(self.params):
            if not self._packed[i]:
                self._pack(
                    i, p.grad
                )  # no hook this step: no gradient (zeros) or one accumulated under no_sync
        self._send_ready()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flats = [_flat(p.grad) for p in self.params]
        for c, work in self._works:
            work.wait()
            self.reducer.unpack(self._buffers[c], self._chunks[c], flats, "avg")
        self._reset()


def broadcast_parameters(
    params: Iterable[Tensor] | nn.Module, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Copy the parameters of rank `src` (its rank within `group`) to every rank of `group`, in place.
    DTensor parameters broadcast their local shard (use a group along which the shards are replicated)."""
    with torch.no_grad():
        for p in _unique(params):
            dist.broadcast(_local(p), group=group, group_src=src)


def reduce_replicate_gradients(
    module_or_params: nn.Module | Iterable[Tensor],
    replicate_group: dist.ProcessGroup,
    reducer: ChunkedAllReduce | None = None,
) -> None:
    """HSDP's replicate-dimension reduction through the chunked all-reduce, after backward.

    For a model sharded with `fully_shard(..., mesh=mesh["shard"])` (FSDP2 on the shard sub-mesh only, so
    FSDP reduce-scatters within a replica and does no all-reduce): averages the local shards of the sharded
    gradients over `replicate_group` in one chunk stream (like Huginn's whole-model stream). Replicas hold the
    same shard layout, so their local shards line up. Gradients that are None are reduced as zeros.
    """
    reducer = reducer or ChunkedAllReduce(replicate_group)
    if reducer.group is not replicate_group:
        raise ValueError("reducer must be a ChunkedAllReduce over replicate_group")
    params = _trainable(module_or_params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reducer.all_reduce_([_local(p.grad) for p in params], op="avg")


def install_replicate_all_reduce_hooks(module: nn.Module, reducer: ChunkedAllReduce) -> None:
    """HSDP's replicate-dimension reduction through the chunked all-reduce, inside backward.

    For a model sharded with `fully_shard` on the shard sub-mesh only: sets FSDP2's all-reduce hook on every
    FSDP unit so that each unit's reduce-scatter output is averaged over `reducer.group` (the replicate group)
    as soon as it exists, before FSDP writes the sharded gradients. Each unit is its own chunk stream, so each
    unit pads its last chunk (up to one chunk of extra traffic per unit). With gradient accumulation, disable
    FSDP's gradient sync (`set_requires_gradient_sync(False)`) on all but the last micro-batch.
    """
    from torch.distributed.fsdp import FSDPModule

    def hook(reduce_output: Tensor) -> None:
        reducer.all_reduce_([reduce_output], op="avg")

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError("install_replicate_all_reduce_hooks: the module has no fully_shard units")
    if any(isinstance(p, DTensor) and p.device_mesh.ndim > 1 for p in module.parameters()):
        raise ValueError(
            "native HSDP (fully_shard on a 2-D mesh) already all-reduces over the replicate dimension; "
            "shard on the shard sub-mesh only (mesh['shard']) to route that reduction through us"
        )
    for m in units:
        m.set_all_reduce_hook(hook)
