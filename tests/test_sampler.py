"""The recurrence-depth sampler: Huginn's distribution, determinism per (seed, step), schemes, curriculum."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from raven_titan.models.raven.args import RavenArgs
from raven_titan.models.raven.sampler import depth_targets, expected_depth, sample_depth

HUGINN = RavenArgs(mean_recurrence=32, mean_backprop_depth=8, sampling_scheme="poisson-lognormal-filling")


def draws(args: RavenArgs, steps: range, seed: int = 0) -> np.ndarray:
    return np.array([sample_depth(args, seed, s) for s in steps])


def test_poisson_lognormal_filling_matches_huginn_statistics():
    nk = draws(HUGINN, range(20_000))
    n, k = nk[:, 0], nk[:, 1]
    r = n + k
    assert abs(r.mean() - 33.0) < 0.5  # E[r] = mean_recurrence + 1
    assert 28 <= np.median(r) <= 30  # spec: median 29
    assert 16.5 < r.std() < 19.5  # spec: sd 18.0
    assert r.min() >= 1 and n.min() >= 0
    assert (k == np.minimum(r, 8)).all()  # backprop through the last min(r, 8) iterations
    assert 0.003 < (r < 8).mean() < 0.015  # spec: P(r < 8) = 0.87%
    assert all(isinstance(x, int) for x in sample_depth(HUGINN, 0, 5))


def test_draws_are_a_pure_function_of_seed_and_step():
    a = draws(HUGINN, range(200), seed=1)
    b = draws(HUGINN, range(200), seed=1)
    assert (a == b).all()
    assert len({tuple(x) for x in a}) > 20  # steps vary
    c = draws(HUGINN, range(200), seed=2)
    assert (a != c).any()
    # (seed, step) pairs do not alias along a diagonal
    assert [sample_depth(HUGINN, 1, s) for s in range(50)] != [
        sample_depth(HUGINN, 0, s + 1) for s in range(50)
    ]
    with pytest.raises(ValueError):
        sample_depth(HUGINN, -1, 0)


def test_other_schemes():
    fixed = dataclasses.replace(HUGINN, sampling_scheme="fixed")
    assert {sample_depth(fixed, 0, s) for s in range(50)} == {(24, 8)}
    base = dataclasses.replace(HUGINN, sampling_scheme="non-recurrent")
    assert {sample_depth(base, 0, s) for s in range(50)} == {(0, 1)}
    fill = draws(dataclasses.replace(HUGINN, sampling_scheme="poisson-fill"), range(5000))
    assert (fill[:, 1] == 8).all()
    assert abs(fill[:, 0].mean() - 24) < 0.3 and abs(fill[:, 0].var() - 24) < 3  # Poisson(24)
    # backprop depth above the mean recurrence is invalid, equal is fine: t = 0
    eq = dataclasses.replace(HUGINN, mean_recurrence=4, mean_backprop_depth=4, sampling_scheme="fixed")
    assert sample_depth(eq, 0, 0) == (0, 4)


def test_curriculum_ramps_depth_linearly():
    args = dataclasses.replace(HUGINN, sampling_scheme="fixed", curriculum_steps=100)
    assert sample_depth(args, 0, 0) == (1, 1)  # ceil(24/100), max(ceil(8/100), 1)
    assert sample_depth(args, 0, 49) == (12, 4)  # half way
    assert sample_depth(args, 0, 99) == (24, 8)  # targets reached at step N - 1
    assert sample_depth(args, 0, 5000) == (24, 8)
    assert depth_targets(args, None) == (24, 8)
    totals = [sum(sample_depth(args, 0, s)) for s in range(100)]
    assert totals == sorted(totals)  # non-decreasing

    ramp = dataclasses.replace(HUGINN, curriculum_steps=1000)
    early = draws(ramp, range(0, 200)).sum(1).mean()
    late = draws(ramp, range(1000, 1200)).sum(1).mean()
    assert early < 0.4 * late
    assert abs(late - 33) < 3


def test_expected_depth():
    n, k = expected_depth(HUGINN)
    assert n + k == pytest.approx(33.0, abs=1e-9)
    assert k == pytest.approx(7.98, abs=0.01)  # spec: E[k] = 7.98
    mc = draws(HUGINN, range(20_000))[:, 1].mean()
    assert k == pytest.approx(mc, abs=0.02)
    assert expected_depth(dataclasses.replace(HUGINN, sampling_scheme="fixed")) == (24.0, 8.0)
    assert expected_depth(dataclasses.replace(HUGINN, sampling_scheme="poisson-fill")) == (24.0, 8.0)
    assert expected_depth(dataclasses.replace(HUGINN, sampling_scheme="non-recurrent")) == (0.0, 1.0)
    ramp = dataclasses.replace(HUGINN, sampling_scheme="fixed", curriculum_steps=100)
    assert expected_depth(ramp, step=49) == (12.0, 4.0)
    assert expected_depth(ramp) == (24.0, 8.0)
