"""Everything applied to the single-device model from outside, in one fixed order:
activation checkpointing -> per-block compile (-> data parallel / FSDP2, in a later version)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _blocks(model: nn.Module) -> list[nn.Module]:
    tr = model.transformer
    return [*tr.prelude, *tr.core_block, *tr.coda]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """none | per-iteration (each gradient core iteration is recomputed in backward: memory O(k)) |
    full (every block is recomputed in backward). Parameter names are unchanged (no wrapper modules)."""
    if mode == "per-iteration":
        model.grad_iteration_wrapper = _checkpointed
    elif mode == "full":
        for block in _blocks(model):
            block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))


def _checkpointed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, determinism_check="none")


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place. The recurrence loop stays in Python, so a new depth reuses the graphs."""
    for block in _blocks(model):
        block.compile(fullgraph=True)


def parallelize(model: nn.Module, job) -> nn.Module:
    apply_activation_checkpointing(model, job.activation_checkpoint.mode)
    if job.compile.enable:
        apply_compile(model)
    return model


def build_model(spec, args, job, device: torch.device) -> nn.Module:
    """Build on the meta device, apply the parallel plan, then materialise and initialise on `device`."""
    with torch.device("meta"):
        model = spec.build(args)
    model = (spec.parallelize or parallelize)(model, job)
    model.to_empty(device=device)
    model.init_weights(seed=job.training.seed)
    return model
