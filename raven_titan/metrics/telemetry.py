"""Recurrence and optimizer telemetry, measured every N steps on one micro-batch (spec §5.7, anchors §1.3).

The two failure modes of Huginn's early runs are what this watches for: token representations collapsing
to one vector (token correlation -> 1.0, "bad run 1") and a model that ignores the recurrence (the state
stops moving: relative residual ~ 0 from the first iterations, "bad run 2"). Everything here is a pure
function of the model / optimizer that the trainer calls only on telemetry steps: nothing is registered,
hooked or copied otherwise, so telemetry that is off costs nothing.

Definitions (all reductions in fp32; "mean" = over every token of every sequence of the micro-batch):

- `token_correlation(x)`: for each sequence, the mean over ordered pairs i != j of the Pearson correlation
  of token vectors x_i, x_j across the feature dimension, i.e. the cosine of the *feature-centred* vectors
  c_i = x_i - mean_f(x_i) (as Huginn's `monitor_module`; centring over the *sequence* instead would make the
  collapsed case 0/0). Averaged over sequences. 1.0 when all tokens of a sequence are the same
  (non-constant) vector; ~0 for independent random tokens (+-1/sqrt(E) per pair). Unlike Huginn we exclude
  the diagonal rather than subtracting 1/S from the full mean (theirs tops out at 1 - 1/S). Computed in O(SE)
  with mean_{i!=j} cos = (|sum u_i|^2 - sum |u_i|^2) / ((sum |u_i|)^2 - sum |u_i|^2) on u_i = c_i/|c_i|
  (|u_i| = 1, or 0 for a constant token, which is then left out of the pairs). Sequences with fewer than two
  non-constant tokens (S == 1 in particular) carry no pair and are left out; with no pair at all: 0.0.
- `recurrence_stats` (s_r = un-normed core state after r = n + k iterations, e = prelude output,
  latent = ln_f(s_r) = the coda's input, hidden = ln_f(coda(latent)) = the lm_head input):
  ``state_norm`` mean |latent| (Huginn's recurrent_state_norm), ``raw_state_norm`` mean |s_r|,
  ``hidden_norm`` mean |hidden|, ``rel_residual`` mean |s_r - s_{r-1}| / |s_r| (the same un-normed state
  both times; Huginn compared ln_f(s_r) with s_{r-1}; NaN when r == 0), ``dist_from_input`` mean
  |s_r - e| / |e| (relative), ``dist_from_init`` mean |s_r - s_0| / |s_r|, ``latent_token_corr`` /
  ``hidden_token_corr`` (token_correlation of latent / hidden), ``num_steps_no_grad`` / ``num_steps_with_grad``
  (the realised n, k).
- `update_stats` per parameter group G (keys ``"{name}/..."``, name = the group's "name" or ``group{i}``),
  over the parameters that had a gradient at snapshot time, with Dp = p_after - p_before, N = numel:
  ``grad_norm`` |g| (the .grad at snapshot time; snapshot before clipping to get the pre-clip norm),
  ``param_norm`` |p_before|, ``update_rms`` |Dp|/sqrt(N), ``rel_update`` |Dp|/|p_before|,
  ``update_per_lr`` update_rms / lr (the LR-free step size: for SGD the gradient RMS, for Adam the RMS of
  the normalised step m/sqrt(v), ~1 at most under update clipping), ``eff_lr`` |Dp| / |g| (the learning
  rate plain SGD would need to move as far along this gradient: exactly lr for SGD; Huginn's per-layer
  "effective Adam LR" lr/sqrt(v), aggregated as norms), ``lr``. Weight decay is part of Dp. NaN where a
  denominator is 0 (e.g. lr = 0 on the first warm-up step).

Wiring (in `Trainer.train_step`, `tele` = telemetry step; `seeds0` = the state seeds of micro-batch 0)::

    total_loss, valid_tokens = self.forward_backward(batches, n, k)
    before = snapshot_params(self.optimizer) if tele else None  # before clipping: pre-clip grad norms
    ...clip, optimizer.step()...
    if tele:
        stats = update_stats(self.optimizer, before)
        with self.autocast():
            stats |= recurrence_stats(self.model, batches[0][0], n, k, state_seeds=seeds0)
        if (msg := collapse_warning(stats)) is not None:
            logger.warning("step %d: %s", self.step + 1, msg)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "RecurrenceTrace",
    "collapse_warning",
    "recurrence_stats",
    "recurrence_trace",
    "snapshot_params",
    "token_correlation",
    "trace_stats",
    "update_stats",
]

_TINY = 1e-30


def _token_correlation(x: Tensor) -> Tensor:
    """0-d fp32 tensor version of `token_correlation` (no host sync)."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"token_correlation expects (B, S, E) or (S, E); got shape {tuple(x.shape)}")
    xf = x.detach().float()
    c = xf - xf.mean(dim=-1, keepdim=True)
    norm = c.norm(dim=-1, keepdim=True)  # (B, S, 1)
    u = torch.where(norm > 0, c / norm.clamp_min(_TINY), torch.zeros_like(c))
    valid = (norm > 0).squeeze(-1).to(torch.float64)  # |u_i| in {0, 1}
    u_norm_sq = u.pow(2).sum(-1).double()  # (B, S), 1 up to rounding for valid tokens
    total = (
        u.sum(dim=1).double().pow(2).sum(-1)
    )  # |sum_i u_i|^2 = sum over all ordered pairs, diagonal included
    diag = u_norm_sq.sum(-1)
    u_len = u_norm_sq.sqrt() * valid
    pairs = (
        u_len.sum(-1).pow(2) - diag
    )  # = S'(S'-1) for S' non-constant tokens (exactly consistent with diag)
    has_pairs = valid.sum(-1) >= 2
    per_seq = torch.where(has_pairs, (total - diag) / pairs.clamp_min(_TINY), torch.zeros_like(total))
    count = has_pairs.sum()
    return (per_seq.sum() / count.clamp_min(1)).float()


def token_correlation(x: Tensor) -> float:
    """Mean pairwise (i != j) Pearson correlation of the token vectors of each sequence, averaged over the
    batch; x is (B, S, E) or (S, E). 1.0 for a collapsed sequence (all tokens equal), ~0 for independent
    tokens. See the module docstring for the exact definition and the degenerate cases."""
    return float(_token_correlation(x))


# ---- recurrence -------------------------------------------------------------------------------------------


@dataclass
class RecurrenceTrace:
    """The tensors of one telemetry forward pass (all detached, in the model's compute dtype)."""

    e: Tensor
    """Prelude output: the input injected into every core iteration."""
    s0: Tensor
    """Initial (random) state."""
    s_prev: Tensor | None
    """s_{r-1}: the un-normed state one iteration before the end (None when r == 0)."""
    s: Tensor
    """s_r: the un-normed final core state."""
    latent: Tensor
    """ln_f(s_r): the coda's input (RavenOutput.latent)."""
    hidden: Tensor
    """ln_f(coda(latent)): the last hidden state, the lm_head's input (logits = lm_head(hidden))."""
    num_steps_no_grad: int
    num_steps_with_grad: int


def _rng_fork(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, enabled=True)


@torch.no_grad()
def recurrence_trace(
    model: nn.Module,
    input_ids: Tensor,
    n: int,
    k: int,
    state_seeds: Sequence[int] | None = None,
    init_scale: float | None = None,
) -> RecurrenceTrace:
    """Run the model's pieces (embed -> initialize_state -> n + k core_step -> ln_f -> coda -> ln_f) under
    no_grad and return the intermediate states. Same computation as `model(input_ids, num_steps=(n, k),
    init_scale, state_seeds)` (all r = n + k iterations here run without autograd). Without `state_seeds`
    the initial-state noise is drawn inside a forked RNG, so telemetry never shifts the training RNG."""
    n, k = int(n), int(k)
    if n < 0 or k < 0:
        raise ValueError(f"(n, k) must be >= 0; got ({n}, {k})")
    scale = model.args.init_scale if init_scale is None else init_scale
    tr = model.transformer
    with _rng_fork(input_ids.device, enabled=state_seeds is None and scale != 0):
        e = model.embed(input_ids)
        s0 = model.initialize_state(e, scale, state_seeds)
    s_prev, s = None, s0
    for _ in range(n + k):
        s_prev, s = s, model.core_step(s, e)
    latent = tr.ln_f(s)
    freqs_cis = model._rope(latent.shape[1])
    x = latent
    for block in tr.coda:  # = model.decode without the head
        x = block(x, freqs_cis)
    hidden = tr.ln_f(x)
    return RecurrenceTrace(e, s0, s_prev, s, latent, hidden, n, k)


def _mean_token_norm(x: Tensor) -> Tensor:
    return x.float().norm(dim=-1).mean()


def _mean_rel_dist(a: Tensor, b: Tensor, ref: Tensor) -> Tensor:
    """Mean over tokens of |a - b| / |ref| (fp32)."""
    diff = (a.float() - b.float()).norm(dim=-1)
    return (diff / ref.float().norm(dim=-1).clamp_min(_TINY)).mean()


def trace_stats(trace: RecurrenceTrace) -> dict[str, float]:
    """Reduce a `RecurrenceTrace` to the telemetry scalars (one host sync)."""
    nan = torch.tensor(float("nan"), device=trace.s.device)
    values = {
        "state_norm": _mean_token_norm(trace.latent),
        "raw_state_norm": _mean_token_norm(trace.s),
        "hidden_norm": _mean_token_norm(trace.hidden),
        "rel_residual": nan if trace.s_prev is None else _mean_rel_dist(trace.s, trace.s_prev, trace.s),
        "dist_from_input": _mean_rel_dist(trace.s, trace.e, trace.e),
        "dist_from_init": _mean_rel_dist(trace.s, trace.s0, trace.s),
        "latent_token_corr": _token_correlation(trace.latent),
        "hidden_token_corr": _token_correlation(trace.hidden),
    }
    floats = torch.stack([v.float() for v in values.values()]).tolist()
    out = dict(zip(values, floats))
    out["num_steps_no_grad"] = float(trace.num_steps_no_grad)
    out["num_steps_with_grad"] = float(trace.num_steps_with_grad)
    return out


def recurrence_stats(
    model: nn.Module,
    input_ids: Tensor,
    n: int,
    k: int,
    state_seeds: Sequence[int] | None = None,
    init_scale: float | None = None,
) -> dict[str, float]:
    """Recurrence telemetry of one micro-batch at depth (n, k): see the module docstring for the keys.

    Costs one no-grad forward without the head: n + k core iterations on `input_ids` (B, S). Call it inside
    the trainer's autocast context to measure the states in the training precision; pass the training
    step's state seeds of that micro-batch to measure the same trajectory as the loss."""
    return trace_stats(recurrence_trace(model, input_ids, n, k, state_seeds, init_scale))


def collapse_warning(stats: dict[str, float], threshold: float = 0.99) -> str | None:
    """A one-line warning if the latent or last-hidden token correlation exceeds `threshold`, else None."""
    hits = [
        f"{what} {stats[key]:.3f}"
        for key, what in (("latent_token_corr", "latent state"), ("hidden_token_corr", "last hidden state"))
        if key in stats and stats[key] > threshold
    ]
    if not hits:
        return None
    return (
        f"token correlation above {threshold:g} ({', '.join(hits)}): token representations are collapsing "
        "(Huginn's failed run 1 went to 1.0); consider a lower optimizer.lr"
    )


# ---- optimizer --------------------------------------------------------------------------------------------


def _group_name(group: dict[str, Any], index: int) -> str:
    return str(group.get("name", f"group{index}"))


@torch.no_grad()
def snapshot_params(optimizer: torch.optim.Optimizer, device: torch.device | str | None = None) -> dict:
    """Before `optimizer.step()`: per group, the gradient norms and a copy of every parameter that has a
    gradient (the others are not updated). The copy costs one extra parameter's worth of memory per
    parameter until `update_stats`; `device="cpu"` keeps it off the accelerator. Call it before gradient
    clipping for pre-clip gradient norms (clipping rescales .grad, not the parameters)."""
    snap: dict[str, dict[str, Any]] = {}
    for i, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        name = _group_name(group, i)
        if name in snap:
            name = f"{name}.{i}"
        grad_sq = [p.grad.detach().float().pow(2).sum() for p in params]
        snap[name] = {
            "params": params,
            "before": [
                p.detach().clone() if device is None else p.detach().to(device, copy=True) for p in params
            ],
            "grad_sq": torch.stack(grad_sq).sum() if grad_sq else None,
            "numel": sum(p.numel() for p in params),
            "lr": float(group["lr"]),
        }
    return snap


@torch.no_grad()
def update_stats(optimizer: torch.optim.Optimizer, before: dict, lr: float | None = None) -> dict[str, float]:
    """After `optimizer.step()`: per group ``{name}/grad_norm``, ``param_norm``, ``update_rms``,
    ``rel_update``, ``update_per_lr``, ``eff_lr``, ``lr`` (see the module docstring). `lr` overrides the
    group LR recorded by `snapshot_params` (the LR the step used). `optimizer` is unused beyond symmetry
    with `snapshot_params` (the snapshot holds the parameters)."""
    del optimizer
    names, sums = [], []
    for name, g in before.items():
        if not g["params"]:
            continue
        delta_sq, param_sq = [], []
        for p, old in zip(g["params"], g["before"]):
            old = old.to(p.device)
            delta_sq.append((p.detach().float() - old.float()).pow(2).sum())
            param_sq.append(old.float().pow(2).sum())
        names.append(name)
        sums.append(torch.stack([g["grad_sq"], torch.stack(delta_sq).sum(), torch.stack(param_sq).sum()]))
    if not sums:
        return {}
    values = torch.stack([s.to(sums[0].device) for s in sums]).double().sqrt().tolist()  # one host sync
    out: dict[str, float] = {}
    for name, (grad_norm, delta, param_norm) in zip(names, values):
        g = before[name]
        group_lr = g["lr"] if lr is None else float(lr)
        update_rms = delta / math.sqrt(g["numel"])
        out[f"{name}/grad_norm"] = grad_norm
        out[f"{name}/param_norm"] = param_norm
        out[f"{name}/update_rms"] = update_rms
        out[f"{name}/rel_update"] = _ratio(delta, param_norm)
        out[f"{name}/update_per_lr"] = _ratio(update_rms, group_lr)
        out[f"{name}/eff_lr"] = _ratio(delta, grad_norm)
        out[f"{name}/lr"] = group_lr
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")
