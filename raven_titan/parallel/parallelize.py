"""Everything applied to the single-device model from outside, in one fixed order:
float8 conversion -> activation checkpointing -> per-block compile -> materialise + init -> data parallel
(FSDP2 / chunked).

Weights are initialised on the full (unsharded) model before FSDP shards it, so every layout starts from
the same weights as a one-process run with the same seed (a 3.5B model is ~14 GB of fp32 per rank while
this happens)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.checkpoint import checkpoint

from raven_titan.parallel import mesh_shape
from raven_titan.parallel.chunked_allreduce import (
    ChunkedAllReduce,
    ChunkedDataParallel,
    broadcast_parameters,
    install_replicate_all_reduce_hooks,
)
from raven_titan.parallel.float8 import apply_float8


def _blocks(model: nn.Module) -> list[nn.Module]:
    tr = model.transformer
    return [*tr.prelude, *tr.core_block, *tr.coda]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """none | per-iteration (each gradient core iteration is recomputed in backward: memory O(k)) |
    selective (per iteration, op-level: matmul and attention outputs are kept, the cheap element-wise ops
    recomputed) | full (every block is recomputed in backward). Parameter names are unchanged."""
    if mode == "per-iteration":
        model.grad_iteration_wrapper = _checkpointed
    elif mode == "selective":
        model.grad_iteration_wrapper = functools.partial(_checkpointed, context_fn=_save_matmuls)
    elif mode == "full":
        for block in _blocks(model):
            block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))


def _checkpointed(fn, *args, context_fn=None):
    kwargs = {"context_fn": context_fn} if context_fn else {}
    return checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=False, determinism_check="none", **kwargs
    )


_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place. The recurrence loop stays in Python, so a new depth reuses the graphs."""
    for block in _blocks(model):
        block.compile(fullgraph=True)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg, param_dtype: torch.dtype) -> None:
    """FSDP2: one unit per prelude / coda block; the root unit holds embedding, tied head, adapter and the
    looped core, so it is gathered once and reduced once per step whatever the sampled depth.

    With `replicate_reduce = "chunked"` the units shard over the shard sub-mesh only and the replicate
    dimension is reduced by the chunked all-reduce inside FSDP's reduce hook."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    chunked_replicate = cfg.replicate_reduce == "chunked" and mesh.size(0) > 1
    fsdp_mesh = mesh["shard"] if chunked_replicate else mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    tr = model.transformer
    for block in [*tr.prelude, *tr.coda]:
        fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, reshard_after_forward=False)
    if chunked_replicate:
        install_replicate_all_reduce_hooks(model, _reducer(cfg, mesh["replicate"].get_group()))


def _reducer(cfg, group) -> ChunkedAllReduce:
    dtype = torch.bfloat16 if cfg.allreduce_dtype == "bfloat16" else torch.float32
    return ChunkedAllReduce(group, chunk_bytes=int(cfg.chunk_size_mb * 2**20), wire_dtype=dtype)


def parallelize(model: nn.Module, job) -> nn.Module:
    apply_float8(model, job.float8)
    apply_activation_checkpointing(model, job.activation_checkpoint.mode)
    if job.compile.enable:
        apply_compile(model)
    return model


def build_mesh(cfg, device: torch.device) -> DeviceMesh | None:
    """The (replicate, shard) data-parallel mesh, or None in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    rep, shard = mesh_shape(cfg, dist.get_world_size())
    return init_device_mesh(device.type, (rep, shard), mesh_dim_names=("replicate", "shard"))


def build_model(spec, args, job, device: torch.device, mesh: DeviceMesh | None = None):
    """Build on the meta device, apply AC and compile, materialise and initialise on `device`, then apply
    data parallelism. Returns (model, gradient reducer or None): the reducer's `reduce_gradients()` must run
    after the last backward of a step (chunked data parallel only; FSDP reduces inside backward)."""
    with torch.device("meta"):
        model = spec.build(args)
    model = (spec.parallelize or parallelize)(model, job)
    model.to_empty(device=device)
    model.init_weights(seed=job.training.seed)
    path = job.checkpoint.initial_load_path
    if path and not (Path(path) / ".metadata").is_file():  # an HF folder or Hub repo (a DCP step: trainer)
        from raven_titan.hf.load import load_hf_weights

        load_hf_weights(model, path)
    if mesh is None:
        return model, None
    cfg = job.parallelism
    if cfg.data_parallel_mode == "chunked":
        group = mesh["replicate"].get_group()  # chunked: the mesh is (world, 1)
        broadcast_parameters(model, src=0, group=group)
        return model, ChunkedDataParallel(model, _reducer(cfg, group), overlap=cfg.overlap_reduce)
    dtype = torch.bfloat16 if job.training.mixed_precision_param == "bfloat16" else torch.float32
    apply_fsdp(model, mesh, cfg, dtype)
    return model, None
