"""Recurrence-aware FLOPs per token (matmul FLOPs only, in the conventions of torch's FlopCounterMode).

Per token, with S the sequence length, h/h_kv/d the (kv-)heads and head dim:
    M = 2 (E (h + 2 h_kv) d + E h d + 3 E I)   dense matmuls of one block, forward (Wqkv, proj, fc, mlp.proj)
    A = 4 S h d                                attention scores + values, forward, counted non-causal
    D = 2 (2E) E  (0 for additive injection)   adapter, forward
    H = 2 E V_pad                              head, forward (tied or not)
Backward costs 2x forward for matmuls and 2.5x for attention (the flash backward recomputes the scores);
recomputed (checkpointed) work runs its forward once more. Training with n no-grad and k grad iterations:
    F = (L_p + L_c)(c_s M + (c_s + .5) A) + n [L_r (M + A) + D] + k [L_r (c_b M + (c_b + .5) A) + c_a D] + 3H
with c = 4 for recomputed parts, else 3: activation checkpointing "none" (all 3), "per-iteration" (core
blocks and adapter of grad iterations recomputed: c_b = c_a = 4), "full" (every block recomputed, the
adapter not: c_s = c_b = 4, c_a = 3).
Nebel (Huginn-0125), S = 4096, (n, k) = (24, 8): 2.169e11 with checkpointing, 1.879e11 without.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from raven_titan.models.raven.args import RavenArgs


def _terms(args: RavenArgs, seq_len: int) -> tuple[float, float, float, float]:
    E, h, h_kv, d = args.n_embd, args.n_heads, args.n_kv_heads, args.head_dim
    M = 2 * (E * (h + 2 * h_kv) * d + h * d * E + 3 * E * args.intermediate_size)
    A = 4 * seq_len * h * d
    D = 2 * 2 * E * E if args.injection_type == "linear" else 0
    H = 2 * E * args.padded_vocab_size
    return float(M), float(A), float(D), float(H)


def flops_per_token(
    args: RavenArgs, seq_len: int, n: float, k: float, ac_mode: str = "per-iteration"
) -> float:
    """Training FLOPs (forward + backward) per token for n no-grad and k >= 1 gradient iterations.

    n and k may be means (see `sampler.expected_depth`): the count is linear in both."""
    if k < 1:
        raise ValueError(f"training needs k >= 1 gradient iterations (got {k}); use forward_flops_per_token")
    M, A, D, H = _terms(args, seq_len)
    Lp, Lr, Lc = args.n_layers_in_prelude, args.n_layers_in_recurrent_block, args.n_layers_in_coda
    if ac_mode not in ("none", "per-iteration", "selective", "full"):
        raise ValueError(f"unknown activation checkpointing mode {ac_mode!r}")
    if ac_mode == "selective":  # matmul and attention outputs are saved: no matmul is recomputed
        ac_mode = "none"
    c_s = 4 if ac_mode == "full" else 3
    c_b = 3 if ac_mode == "none" else 4
    c_a = 4 if ac_mode == "per-iteration" else 3
    return (
        (Lp + Lc) * (c_s * M + (c_s + 0.5) * A)
        + n * (Lr * (M + A) + D)
        + k * (Lr * (c_b * M + (c_b + 0.5) * A) + c_a * D)
        + 3 * H
    )


def forward_flops_per_token(args: RavenArgs, seq_len: int, r: float) -> float:
    """Inference (forward-only) FLOPs per token at r core iterations."""
    M, A, D, H = _terms(args, seq_len)
    Lp, Lr, Lc = args.n_layers_in_prelude, args.n_layers_in_recurrent_block, args.n_layers_in_coda
    return (Lp + Lc + r * Lr) * (M + A) + r * D + H


def flop_counter_mapping() -> dict:
    """Extra formulas for `FlopCounterMode(custom_mapping=...)`: torch counts SDPA only for its GPU kernels;
    this adds the CPU flash kernel (same formula), so CPU measurements use the same conventions."""
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
    }


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


__all__ = ["flop_counter_mapping", "flops_per_token", "forward_flops_per_token"]
