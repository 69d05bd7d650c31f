"""Learning-rate schedules (reference spec §5.4), applied to EVERY parameter group.

Huginn's ZeRO wrapper leaked the schedule: its weight matrices trained at the constructor LR with no warm-up.
Here one ``LambdaLR`` scales every group: ``group["lr"] = group["initial_lr"] * lr_factor(step)``.

Semantics. Let W = warmup_steps, D = decay_steps, T = total_steps, m = min_lr_factor, and let f(x) be a
continuous curve over x in [0, T]. Optimizer step ``step`` (0, 1, ..., T-1) uses f(step + 1), the value at the
*end* of its interval, so every phase ends exactly on its target and no step runs at LR 0 during warm-up:

* warm-up (x <= W):  f = x / W  -> step 0 uses 1/W, the last warm-up step (W-1) uses the peak, 1.
* after warm-up, with progress p = (x - W) / (T - W) clamped to [0, 1]:
    ``warmup-stable-decay``: 1 until the last D steps, then f = 1 - (x - (T - D)) / D * (1 - m),
                             i.e. steps T-D .. T-1 step down linearly and the final step uses m exactly;
    ``cosine``:   f = m + 0.5 * (1 + cos(pi * p)) * (1 - m)  (the final step uses m);
    ``linear``:   f = 1 - p * (1 - m)                         (the final step uses m);
    ``constant``: f = 1.
Steps past T keep the final value. ``decay_steps`` only applies to warmup-stable-decay.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from raven_titan.errors import RavenError

if TYPE_CHECKING:
    from raven_titan.config.job_config import LRScheduler as LRSchedulerConfig

__all__ = ["lr_factor", "check_schedule", "build_lr_scheduler"]

SCHEDULES = ("warmup-stable-decay", "cosine", "linear", "constant")


def check_schedule(cfg: LRSchedulerConfig, total_steps: int) -> str | None:
    """A one-line error message when `cfg` does not fit in `total_steps` optimizer steps, else None."""
    if cfg.schedule not in SCHEDULES:
        return f"lr_scheduler.schedule '{cfg.schedule}' is unknown: use one of {', '.join(SCHEDULES)}"
    if total_steps < 1:
        return f"training.steps is {total_steps}: set --training.steps to at least 1"
    decay = cfg.decay_steps if cfg.schedule == "warmup-stable-decay" else 0
    if cfg.warmup_steps + decay > total_steps:
        if decay:
            return (
                f"lr_scheduler.warmup_steps ({cfg.warmup_steps}) + lr_scheduler.decay_steps ({decay}) exceed "
                f"training.steps ({total_steps}): lower them or raise --training.steps to at least "
                f"{cfg.warmup_steps + decay}"
            )
        return (
            f"lr_scheduler.warmup_steps ({cfg.warmup_steps}) exceeds training.steps ({total_steps}): "
            f"lower --lr_scheduler.warmup_steps or raise --training.steps to at least {cfg.warmup_steps}"
        )
    return None


def lr_factor(cfg: LRSchedulerConfig, step: int, total_steps: int) -> float:
    """Fraction of the peak LR used by optimizer step `step` (0-based) of a `total_steps`-step run."""
    x = step + 1  # the end of this step's interval
    warmup, min_f = cfg.warmup_steps, cfg.min_lr_factor
    if x <= warmup:
        return x / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "warmup-stable-decay":
        decay = cfg.decay_steps
        if decay == 0:
            return 1.0
        frac = min(max((x - (total_steps - decay)) / decay, 0.0), 1.0)
        return 1.0 - frac * (1.0 - min_f)
    span = total_steps - warmup
    progress = min((x - warmup) / span, 1.0) if span > 0 else 1.0
    if cfg.schedule == "cosine":
        return min_f + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_f)
    if cfg.schedule == "linear":
        return 1.0 - progress * (1.0 - min_f)
    raise RavenError(f"lr_scheduler.schedule '{cfg.schedule}' is unknown: use one of {', '.join(SCHEDULES)}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRSchedulerConfig, total_steps: int
) -> LambdaLR:
    """A LambdaLR giving every group ``initial_lr * lr_factor(cfg, step, total_steps)``.

    Call ``scheduler.step()`` once after each ``optimizer.step()``; right after construction the groups hold
    the LR of step 0. ``state_dict`` / ``load_state_dict`` restore the position (the lambda comes from cfg).
    """
    error = check_schedule(cfg, total_steps)
    if error:
        raise RavenError(error)

    def factor(step: int) -> float:
        return lr_factor(cfg, step, total_steps)

    return LambdaLR(optimizer, factor)
