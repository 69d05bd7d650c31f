"""Training-time recurrence depth: (n, k) = (iterations under no_grad, iterations with autograd).

The draw is a pure function of (seed, step): every rank computes the same (n, k) without communication,
and a resumed run reproduces the sequence exactly. Schemes (Huginn report / spec §2.1), with
t = max(mean_recurrence - mean_backprop_depth, 0) and s = mean_backprop_depth:

- `poisson-lognormal-filling` (Huginn): lambda ~ LogNormal(ln(t+s) - sigma^2/2, sigma=0.5),
  r = Poisson(lambda) + 1, n = max(r - s, 0), k = min(s, r). E[r] = t + s + 1; k = s whenever r >= s.
- `poisson-fill`: n ~ Poisson(t), k = s.
- `fixed`: n = t, k = s.
- `non-recurrent`: n = 0, k = 1.

Curriculum (`curriculum_steps` = N > 0): at step < N, t and s are replaced by
t_N = ceil((step + 1) * t / N) and s_N = max(ceil((step + 1) * s / N), 1) (exact integer arithmetic), so the
mean depth and the backprop depth ramp linearly to their targets, reached at step N - 1 and kept after.
"""

from __future__ import annotations

import math

import numpy as np

from raven_titan.models.raven.args import RavenArgs

LOGNORMAL_SIGMA = 0.5


def depth_targets(args: RavenArgs, step: int | None = None) -> tuple[int, int]:
    """(t, s): the mean no-grad depth and the backprop depth at `step`, after the curriculum ramp."""
    t, s = max(args.mean_recurrence - args.mean_backprop_depth, 0), args.mean_backprop_depth
    N = args.curriculum_steps
    if step is not None and N > 0 and step < N:
        t = -(-(step + 1) * t // N)
        s = max(-(-(step + 1) * s // N), 1)
    return t, s


def sample_depth(args: RavenArgs, seed: int, step: int) -> tuple[int, int]:
    """Draw (n, k) for `step` of a run seeded with `seed`; deterministic and identical on every rank."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed ({seed}) and step ({step}) must be >= 0")
    t, s = depth_targets(args, step)
    scheme = args.sampling_scheme
    if scheme == "fixed":
        return t, s
    if scheme == "non-recurrent":
        return 0, 1
    rng = np.random.default_rng([seed, step])  # SeedSequence: (seed, step) pairs never collide
    if scheme == "poisson-fill":
        return int(rng.poisson(t)), s
    if scheme == "poisson-lognormal-filling":
        mu = math.log(t + s) - LOGNORMAL_SIGMA**2 / 2
        r = int(rng.poisson(rng.lognormal(mu, LOGNORMAL_SIGMA))) + 1
        return max(r - s, 0), min(s, r)
    raise ValueError(f"unknown sampling_scheme {scheme!r}")


def expected_depth(args: RavenArgs, step: int | None = None) -> tuple[float, float]:
    """Mean (n, k) of the sampler (at `step`, for a curriculum): FLOPs are linear in n and k, so
    flops_per_token(..., *expected_depth(args)) is the expected FLOPs per token."""
    t, s = depth_targets(args, step)
    scheme = args.sampling_scheme
    if scheme in ("fixed", "poisson-fill"):
        return float(t), float(s)
    if scheme == "non-recurrent":
        return 0.0, 1.0
    if scheme == "poisson-lognormal-filling":
        # E[r] = E[lambda] + 1 = t + s + 1 exactly; E[k] = s - sum_{r<s} (s - r) P(r), with
        # P(r) = E_lambda[Poisson(r - 1; lambda)] by Gauss-Hermite quadrature over ln(lambda) (error ~1e-12).
        mu = math.log(t + s) - LOGNORMAL_SIGMA**2 / 2
        x, w = np.polynomial.hermite.hermgauss(200)
        lam = np.exp(mu + math.sqrt(2.0) * LOGNORMAL_SIGMA * x)
        w = w / math.sqrt(math.pi)
        mean_k = float(s)
        for r in range(1, s):
            m = r - 1
            p_r = float(np.sum(w * np.exp(-lam + m * np.log(lam) - math.lgamma(m + 1))))
            mean_k -= (s - r) * p_r
        return float(t + s + 1) - mean_k, mean_k
    raise ValueError(f"unknown sampling_scheme {scheme!r}")


__all__ = ["depth_targets", "expected_depth", "sample_depth"]
