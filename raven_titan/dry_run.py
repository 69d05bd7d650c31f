"""`--job.dry_run`: build the model on the meta device (no weights allocated) and report its size, FLOPs per
token at the mean depth, an estimate of memory per device, and the batch / accumulation decomposition."""

from __future__ import annotations

import logging

import torch

from raven_titan.config.job_config import JobConfig
from raven_titan.models import get_model_spec
from raven_titan.parallel import data_parallel_size, mesh_shape

logger = logging.getLogger("raven_titan")

GiB = 2**30


def estimate_memory(args, job: JobConfig, n_params: int, dp_shard: int) -> dict[str, float]:
    """Rough bytes per device. Weights, gradients and Adam moments are fp32 (16 B/param), divided by the
    FSDP shard degree. Activations are estimated per block as (12E + 5I) saved elements per token (norm
    inputs in fp32, projections, attention and MLP intermediates), which is an approximation, not a measurement."""
    t = job.training
    b = 2 if t.mixed_precision_param == "bfloat16" else 4
    tokens = t.local_batch_size * t.seq_len
    E, I = args.n_embd, args.intermediate_size
    block = tokens * (12 * E + 5 * I) * b
    state = tokens * E * b
    mode = job.activation_checkpoint.mode
    k = args.mean_backprop_depth
    static_blocks = args.n_layers_in_prelude + args.n_layers_in_coda
    if mode == "none":
        acts = (static_blocks + k * args.n_layers_in_recurrent_block) * block
    elif mode == "per-iteration":
        acts = static_blocks * block + k * 2 * state + args.n_layers_in_recurrent_block * block
    else:  # full: block inputs kept, one block recomputed at a time
        acts = (static_blocks + k * args.n_layers_in_recurrent_block) * state + block
    logits = 2 * tokens * args.padded_vocab_size * 4
    return {
        "weights+grads+optimizer": 16 * n_params / dp_shard,
        "activations (estimate)": acts + logits + state,
    }


def dry_run(job: JobConfig) -> dict:
    spec = get_model_spec(job.model.name)
    args = spec.resolve_args(job.model)
    with torch.device("meta"):
        model = spec.build(args)
    total = sum(p.numel() for p in model.parameters())  # unique: a tied weight is counted once
    counts = spec.num_params(args)
    t = job.training
    dp = data_parallel_size(job.parallelism)
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dp
    accum = global_batch // (t.local_batch_size * dp)
    ckpt = job.activation_checkpoint.mode
    n_mean, k_mean = spec.expected_depth(args) if spec.expected_depth else (0.0, 1.0)
    fpt = spec.flops_per_token(args, t.seq_len, n_mean, k_mean, ckpt)
    _, shard = mesh_shape(job.parallelism, dp)
    shard = 1 if job.parallelism.data_parallel_mode == "chunked" else shard
    mem = estimate_memory(args, job, total, shard)
    unfolded = counts["static"] + (n_mean + k_mean) * counts["core"]
    lines = [
        f"dry run: model {job.model.name}/{job.model.flavor} on the meta device (no weights allocated)",
        f"  parameters      {total:,} total (core block {counts['core']:,}; static {counts['static']:,})",
        f"  mean depth      n = {n_mean:.2f} no-grad + k = {k_mean:.2f} grad iterations "
        f"(unfolds to {unfolded / 1e9:.2f}B materialised parameters)",
        f"  FLOPs/token     {fpt:.4g} (training, mean depth, seq {t.seq_len}, "
        f"activation checkpointing {job.activation_checkpoint.mode})",
        f"  FLOPs/step      {fpt * global_batch * t.seq_len:.4g}",
        f"  batch           global {global_batch} = local {t.local_batch_size} x accumulation {accum} x "
        f"data-parallel {dp}; {global_batch * t.seq_len:,} tokens/step",
        "  memory/device   "
        + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in mem.items())
        + f"; total ~{sum(mem.values()) / GiB:.2f} GiB",
    ]
    for line in lines:
        logger.info(line)
    return {
        "params": total,
        "flops_per_token": fpt,
        "global_batch": global_batch,
        "accumulation": accum,
        "memory_bytes": mem,
    }
