"""ELLISAdam against hand-computed steps, parameter groups and the optimizer factory."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from raven_titan.config.job_config import Optimizer as OptimizerConfig
from raven_titan.errors import RavenError
from raven_titan.optim import ELLISAdam, build_optimizer, build_param_groups

# ---- ELLISAdam: plain-Python reference of spec §5.5 -------------------------------------------------------


def reference_steps(p0, grads, lrs, peak_lr, betas, eps, wd, clip, atan, running_init, decouple):
    """Expected parameters after len(grads) steps, with lists and the math module only.

    Returns (params, [update clipping active at each step]).
    """
    b1, b2 = betas
    n = len(p0)
    p = list(p0)
    m = list(grads[0]) if running_init else [0.0] * n
    v = [g * g for g in grads[0]] if running_init else [0.0] * n
    active = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        eta = lr
        if clip:
            v = [max(vi, eps * eps) for vi in v]
            rms = math.sqrt(sum(gi * gi / vi for gi, vi in zip(g, v)) / n)
            active.append(rms > 1)
            eta = lr / max(rms, 1.0)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        eta = eta / bc1
        shrink = 1 - (lr / peak_lr) * wd if decouple else 1 - lr * wd
        p = [pi * shrink for pi in p]
        if atan:
            u = [math.atan2(mi, math.sqrt(vi) / math.sqrt(bc2)) for mi, vi in zip(m, v)]
        else:
            u = [mi / (math.sqrt(vi) / math.sqrt(bc2) + eps) for mi, vi in zip(m, v)]
        p = [pi - eta * ui for pi, ui in zip(p, u)]
    return p, active


def run_ellis(p0, grads, lrs, peak_lr, **kw):
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = ELLISAdam([p], lr=peak_lr, **kw)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().tolist(), opt


P0 = [0.5, -1.25, 2.0]
# name: (grads of 2 steps, flags, expected "update clipping active" per step, or [] when clipping is off)
CASES = {
    # running init, step-2 gradient much larger than the first: clipping active at step 2
    "atan-clip-running-active": (
        [[0.1, -0.2, 0.3], [2.0, 1.5, -3.0]],
        dict(update_clipping=True, atan_adam=True, running_init=True, decouple_wd=True),
        [False, True],
    ),
    # running init, smaller step-2 gradient: clipping inactive at both steps (rms = 1 at step 1)
    "atan-clip-running-inactive": (
        [[1.0, -2.0, 3.0], [0.1, 0.2, -0.1]],
        dict(update_clipping=True, atan_adam=True, running_init=True, decouple_wd=True),
        [False, False],
    ),
    # zero init: v = (1 - beta2) g^2 at step 1, so rms = sqrt(1 / (1 - beta2)) > 1; a zero gradient entry
    # exercises the in-place eps^2 floor of v (it changes v for step 2)
    "plain-clip-zeros": (
        [[0.3, 0.0, -0.5], [0.2, 0.4, 0.1]],
        dict(update_clipping=True, atan_adam=False, running_init=False, decouple_wd=True),
        [True, True],
    ),
    "plain-noclip-zeros-coupled": (
        [[0.3, -0.7, 0.5], [-0.2, 0.4, 0.1]],
        dict(update_clipping=False, atan_adam=False, running_init=False, decouple_wd=False),
        [],
    ),
    "atan-noclip-running-coupled": (
        [[0.3, -0.7, 0.5], [-0.2, 0.4, 0.1]],
        dict(update_clipping=False, atan_adam=True, running_init=True, decouple_wd=False),
        [],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ellis_adam_matches_hand_computed_steps(case):
    grads, flags, expected_active = CASES[case]
    peak, betas, eps, wd = 0.1, (0.9, 0.95), 1e-3, 0.2
    lrs = [peak, 0.5 * peak]  # the second step at 50% of the peak (scheduled LR)
    got, _ = run_ellis(P0, grads, lrs, peak, betas=betas, eps=eps, weight_decay=wd, **flags)
    switches = [flags[k] for k in ("update_clipping", "atan_adam", "running_init", "decouple_wd")]
    want, active = reference_steps(P0, grads, lrs, peak, betas, eps, wd, *switches)
    assert active == expected_active  # the case covers what it claims to cover
    for g, w in zip(got, want):
        assert abs(g - w) < 1e-12, (case, got, want)


def test_ellis_adam_first_step_closed_form():
    """Running init + atan + clipping, one step: m = g, v = g^2, rms = 1, eta = lr / (1 - beta1),
    u = atan2(g, |g| / sqrt(1 - beta2)) = sign(g) * atan(sqrt(1 - beta2))."""
    lr, wd = 0.01, 0.1
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    flags = dict(update_clipping=True, atan_adam=True, running_init=True, decouple_wd=True)
    opt = ELLISAdam([p], lr=lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=wd, **flags)
    p.grad = torch.tensor([3.0, -0.5], dtype=torch.float64)
    opt.step()
    step = 10 * lr * math.atan(math.sqrt(0.05))  # 10 = 1 / (1 - 0.9)
    expected = [1.0 * (1 - wd) - step, -2.0 * (1 - wd) + step]
    assert p.detach().tolist() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("peak", [1e-3, 1e-1])
def test_decoupled_weight_decay_follows_schedule_fraction_not_lr_magnitude(peak):
    wd = 0.2
    p = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = ELLISAdam([p], lr=peak, weight_decay=wd, update_clipping=True, atan_adam=True, running_init=True)
    opt.param_groups[0]["lr"] = 0.5 * peak  # 50% of the peak
    p.grad = torch.zeros_like(p)  # no update direction: only the decay acts
    opt.step()
    assert p.detach().tolist() == pytest.approx([x * (1 - 0.5 * wd) for x in [1.0, -3.0, 0.5]], abs=1e-15)
    # the eps^2 floor was applied to v in place
    assert opt.state[p]["exp_avg_sq"].tolist() == pytest.approx([1e-12] * 3, rel=1e-12)

    q = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    coupled = ELLISAdam([q], lr=peak, weight_decay=wd, decouple_wd=False)
    q.grad = torch.zeros_like(q)
    coupled.step()
    assert q.item() == pytest.approx(2.0 * (1 - peak * wd), abs=1e-15)


def test_grad_none_is_skipped_and_low_precision_params_keep_fp32_state():
    a = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    b = nn.Parameter(torch.ones(3))
    opt = ELLISAdam([a, b], lr=0.1, update_clipping=True, atan_adam=True, running_init=True)
    a.grad = torch.full((4,), 0.3, dtype=torch.bfloat16)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(3))
    assert a.dtype == torch.bfloat16 and not torch.equal(a.detach(), torch.ones(4, dtype=torch.bfloat16))
    v = opt.state[a]["exp_avg_sq"]
    assert v.dtype == torch.float32 and not torch.equal(v, v.bfloat16().float())  # not bf16-representable
    fresh = ELLISAdam([a, b], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.state[a]["exp_avg_sq"], v)  # loaded as fp32, no round trip through bf16


def _toy_grads(params, k):
    gen = torch.Generator().manual_seed(k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("name", ["ELLISAdam", "AdamW"])
def test_state_dict_round_trip_is_bit_exact(name):
    torch.manual_seed(0)
    model = ToyRaven()
    cfg = OptimizerConfig(name=name, lr=1e-2)
    opt = build_optimizer(model, cfg)
    params = list(model.parameters())
    for k in range(3):
        _toy_grads(params, k)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for k in range(3, 6):
        _toy_grads(params, k)
        opt.step()

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = ToyRaven()
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(saved["opt"])
    params2 = list(resumed.parameters())
    for k in range(3, 6):
        _toy_grads(params2, k)
        opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


# ---- parameter groups --------------------------------------------------------------------------------------


class ToyAttention(nn.Module):
    def __init__(self, e: int = 8, heads: int = 2):
        super().__init__()
        self.Wqkv = nn.Linear(e, 3 * e, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, heads, e // heads))  # 4-D, but a bias
        self.proj = nn.Linear(e, e, bias=False)


class ToyBlock(nn.Module):
    def __init__(self, e: int = 8):
        super().__init__()
        self.norm_1 = nn.RMSNorm(e)
        self.attn = ToyAttention(e)
        self.fc = nn.Linear(e, 2 * e, bias=True)


class ToyRaven(nn.Module):
    def __init__(self, e: int = 8, vocab: int = 32):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, e),
                core_block=nn.ModuleList([ToyBlock(e)]),
                adapter=nn.Linear(2 * e, e, bias=False),
                ln_f=nn.RMSNorm(e),
            )
        )
        self.lm_head = nn.Linear(e, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("no_wd", [True, False])
def test_param_groups_by_name(no_wd):
    model = ToyRaven()
    t, blk = model.transformer, model.transformer.core_block[0]
    groups = build_param_groups(model, weight_decay=0.3, no_weight_decay_for_bias_and_norm=no_wd)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["weights", "embedding", "norm_bias"]
    assert by_name["embedding"]["params"] == [t.wte.weight]  # the tied weight, once
    assert model.lm_head.weight is t.wte.weight
    assert _ids(by_name["norm_bias"]["params"]) == _ids(
        [blk.norm_1.weight, blk.attn.qk_bias, blk.fc.bias, t.ln_f.weight]
    )
    assert _ids(by_name["weights"]["params"]) == _ids(
        [blk.attn.Wqkv.weight, blk.attn.proj.weight, blk.fc.weight, t.adapter.weight]
    )
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len(list(model.parameters())) == len(_ids(p for g in groups for p in g["params"]))
    assert by_name["weights"]["weight_decay"] == by_name["embedding"]["weight_decay"] == 0.3
    assert by_name["norm_bias"]["weight_decay"] == (0.0 if no_wd else 0.3)


def test_param_groups_empty_group_omitted_and_unknown_param_raises():
    groups = build_param_groups(nn.Sequential(nn.Linear(4, 4, bias=False)), 0.1, True)
    assert [g["name"] for g in groups] == ["weights"]

    model = ToyRaven()
    model.transformer.core_block[0].register_parameter("gate_scale", nn.Parameter(torch.ones(8)))
    with pytest.raises(RavenError, match=r"transformer\.core_block\.0\.gate_scale"):
        build_param_groups(model, 0.1, True)


def test_build_optimizer_uses_config():
    model = ToyRaven()
    cfg = OptimizerConfig(name="AdamW", lr=2e-3, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.05)
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    for g in opt.param_groups:
        assert g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {
        "weights": 0.05,
        "embedding": 0.05,
        "norm_bias": 0.0,
    }

    cfg = OptimizerConfig(
        name="ELLISAdam", lr=4e-5, atan_adam=False, running_init=False, update_clipping=True
    )
    opt = build_optimizer(model, cfg)
    assert type(opt) is ELLISAdam
    for g in opt.param_groups:
        assert g["lr"] == g["initial_lr"] == 4e-5
        assert (g["atan_adam"], g["running_init"], g["update_clipping"], g["decouple_wd"]) == (
            False,
            False,
            True,
            True,
        )

    bad = copy.copy(cfg)
    bad.name = "Lion"
    with pytest.raises(RavenError, match="Lion"):
        build_optimizer(model, bad)
