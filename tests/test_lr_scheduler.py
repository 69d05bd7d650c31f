"""LR schedule values at key steps, validation, and the schedule reaching every parameter group."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raven_titan.config.job_config import LRScheduler
from raven_titan.config.job_config import Optimizer as OptimizerConfig
from raven_titan.errors import RavenError
from raven_titan.optim import ELLISAdam, build_lr_scheduler, build_optimizer, check_schedule, lr_factor

T = 100  # total steps; warm-up 10, decay 20, min 0.1 below


def cfg(schedule, warmup=10, decay=20, min_f=0.1):
    return LRScheduler(schedule=schedule, warmup_steps=warmup, decay_steps=decay, min_lr_factor=min_f)


@pytest.mark.parametrize("schedule", ["warmup-stable-decay", "cosine", "linear", "constant"])
def test_warmup_is_linear_from_1_over_w_to_peak(schedule):
    c = cfg(schedule)
    assert lr_factor(c, 0, T) == pytest.approx(0.1)  # first step not at LR 0
    assert lr_factor(c, 4, T) == pytest.approx(0.5)
    assert lr_factor(c, 9, T) == 1.0  # last warm-up step at the peak


def test_warmup_stable_decay_values():
    c = cfg("warmup-stable-decay")
    assert lr_factor(c, 10, T) == 1.0
    assert lr_factor(c, 50, T) == 1.0
    assert lr_factor(c, 79, T) == 1.0  # last stable step
    assert lr_factor(c, 80, T) == pytest.approx(1 - (1 / 20) * 0.9)  # first decay step
    assert lr_factor(c, 89, T) == pytest.approx(0.55)
    assert lr_factor(c, 99, T) == pytest.approx(0.1)  # final step at min
    assert lr_factor(c, 150, T) == pytest.approx(0.1)  # past the end: stays at min
    assert lr_factor(cfg("warmup-stable-decay", decay=0), 99, T) == 1.0  # no decay: trapezoid never cools


def test_cosine_values():
    c = cfg("cosine")
    assert lr_factor(c, 10, T) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 90)) * 0.9)
    assert lr_factor(c, 54, T) == pytest.approx(0.55)  # mid-way through the 90 post-warm-up steps
    assert lr_factor(c, 99, T) == pytest.approx(0.1)
    assert lr_factor(cfg("cosine", warmup=0), 0, T) == pytest.approx(
        0.1 + 0.5 * (1 + math.cos(math.pi / T)) * 0.9
    )


def test_linear_and_constant_values():
    c = cfg("linear")
    assert lr_factor(c, 10, T) == pytest.approx(1 - 0.9 / 90)
    assert lr_factor(c, 54, T) == pytest.approx(0.55)
    assert lr_factor(c, 99, T) == pytest.approx(0.1)
    c = cfg("constant")
    assert [lr_factor(c, s, T) for s in (10, 54, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(cfg("constant", warmup=0), 0, T) == 1.0


def test_check_schedule():
    assert check_schedule(cfg("warmup-stable-decay", warmup=40, decay=60), T) is None  # exactly fits
    msg = check_schedule(cfg("warmup-stable-decay", warmup=50, decay=60), T)
    assert msg and "warmup_steps" in msg and "decay_steps" in msg and "training.steps" in msg
    assert "\n" not in msg
    with pytest.raises(RavenError, match="decay_steps"):
        build_lr_scheduler(
            torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0), cfg("warmup-stable-decay", 50, 60), T
        )
    # decay_steps only shapes warmup-stable-decay; the others need warm-up <= total
    assert check_schedule(cfg("cosine", warmup=50, decay=60), T) is None
    assert "warmup_steps" in check_schedule(cfg("cosine", warmup=101, decay=0), T)


def _model():
    return nn.ModuleDict(dict(wte=nn.Embedding(16, 4), proj=nn.Linear(4, 4, bias=False), norm=nn.RMSNorm(4)))


@pytest.mark.parametrize("name", ["ELLISAdam", "AdamW"])
def test_schedule_applies_to_every_group(name):
    """Huginn's ZeRO wrapper left the weights group at the constructor LR; here all groups follow."""
    model = _model()
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=1e-2))
    assert len(opt.param_groups) == 3
    c = cfg("warmup-stable-decay", warmup=4, decay=4)
    sched = build_lr_scheduler(opt, c, 12)
    for step in range(12):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(1e-2 * lr_factor(c, step, 12), rel=1e-12), (g["name"], step)
        opt.step()
        sched.step()


def test_schedule_scales_per_group_peaks_and_decoupled_decay_of_every_group():
    a, b = (
        nn.Parameter(torch.ones(2, 2, dtype=torch.float64)),
        nn.Parameter(torch.ones(3, dtype=torch.float64)),
    )
    opt = ELLISAdam([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], lr=1.0, weight_decay=0.1)
    build_lr_scheduler(opt, cfg("constant", warmup=2), 10)  # step 0: factor 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.25]
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    opt.step()  # zero gradients: only the decoupled decay, wd * 0.5 in BOTH groups
    assert torch.allclose(a, torch.full_like(a, 0.95), atol=0, rtol=1e-15)
    assert torch.allclose(b, torch.full_like(b, 0.95), atol=0, rtol=1e-15)


def test_scheduler_state_dict_round_trip():
    c = cfg("cosine", warmup=3)
    opt = build_optimizer(_model(), OptimizerConfig(name="ELLISAdam", lr=1e-3))
    sched = build_lr_scheduler(opt, c, 20)
    for _ in range(7):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()

    opt2 = build_optimizer(_model(), OptimizerConfig(name="ELLISAdam", lr=1e-3))
    sched2 = build_lr_scheduler(opt2, c, 20)
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    for _ in range(3):
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(c, 10, 20), rel=1e-12)
