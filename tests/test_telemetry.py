"""Recurrence and optimizer telemetry on constructed inputs: collapse => correlation 1, fixed point =>
residual 0, hand-computed optimizer update statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raven_titan.metrics.telemetry import (
    collapse_warning,
    recurrence_stats,
    recurrence_trace,
    snapshot_params,
    token_correlation,
    update_stats,
)
from raven_titan.models.raven.args import RavenArgs
from raven_titan.models.raven.model import RavenForCausalLM
from raven_titan.optim.param_groups import build_param_groups

KEYS = {
    "state_norm",
    "raw_state_norm",
    "hidden_norm",
    "rel_residual",
    "dist_from_input",
    "dist_from_init",
    "latent_token_corr",
    "hidden_token_corr",
    "num_steps_no_grad",
    "num_steps_with_grad",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add contention on a shared machine (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> RavenForCausalLM:
    kw = dict(
        n_embd=32,
        n_heads=4,
        intermediate_size=48,
        vocab_size=100,
        padding_multiple=64,
        block_size=16,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
        mean_backprop_depth=2,
    )
    kw.update(overrides)
    model = RavenForCausalLM(RavenArgs(**kw))
    model.init_weights(seed)
    with torch.no_grad():  # non-trivial norm gains, so that ln_f(norm_4(x)) != norm_4(x)
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def brute_force_corr(x: torch.Tensor) -> float:
    """Mean off-diagonal Pearson correlation per sequence via the explicit Gram matrix, constant tokens
    left out, averaged over sequences that have a pair."""
    vals = []
    for seq in x.double():
        c = seq - seq.mean(-1, keepdim=True)
        c = c[c.norm(dim=-1) > 0]
        if len(c) < 2:
            continue
        u = c / c.norm(dim=-1, keepdim=True)
        gram = u @ u.T
        m = len(u)
        vals.append(float((gram.sum() - gram.diagonal().sum()) / (m * (m - 1))))
    return sum(vals) / len(vals) if vals else 0.0


# ---- token correlation ------------------------------------------------------------------------------------


def test_identical_tokens_give_correlation_one():
    g = torch.Generator().manual_seed(0)
    per_seq = torch.randn(3, 1, 256, generator=g) * torch.tensor([1.0, 50.0, 1e-3]).view(3, 1, 1)
    x = per_seq.expand(3, 64, 256).contiguous()  # each sequence collapsed to its own vector
    assert abs(token_correlation(x) - 1.0) < 1e-6
    assert abs(token_correlation(x.bfloat16()) - 1.0) < 1e-6


def test_independent_random_tokens_give_correlation_near_zero():
    x = torch.randn(4, 64, 256, generator=torch.Generator().manual_seed(1))
    assert abs(token_correlation(x)) < 0.1
    # A shared offset added to every feature of a token is removed by the feature centring.
    assert abs(token_correlation(x + 10.0 * torch.randn(4, 64, 1))) < 0.1


def test_token_correlation_matches_gram_matrix_and_degenerate_cases():
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(2, 1, 48, generator=g)
    x = 0.7 * shared + torch.randn(2, 10, 48, generator=g)  # partial collapse: correlation strictly in (0, 1)
    x[0, 3] = 5.0  # a constant token: no direction after centring, left out of the pairs
    expected = brute_force_corr(x)
    assert 0.2 < expected < 0.8
    assert token_correlation(x) == pytest.approx(expected, abs=1e-6)
    assert token_correlation(x[1]) == pytest.approx(brute_force_corr(x[1:]), abs=1e-6)  # (S, E) input
    assert token_correlation(x[:, :1]) == 0.0  # S == 1: no pair
    assert token_correlation(-x[:, :2]) == pytest.approx(brute_force_corr(x[:, :2]), abs=1e-6)
    anti = torch.stack([shared[0, 0], -shared[0, 0]])  # two anti-correlated tokens
    assert token_correlation(anti) == pytest.approx(-1.0, abs=1e-6)


# ---- recurrence statistics --------------------------------------------------------------------------------


def test_stats_on_a_tiny_model_have_all_keys_finite_and_the_realised_depth():
    model = tiny_model()
    stats = recurrence_stats(model, ids(), 3, 2, state_seeds=[5, 6])
    assert set(stats) == KEYS
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert (stats["num_steps_no_grad"], stats["num_steps_with_grad"]) == (3.0, 2.0)
    assert stats["rel_residual"] > 1e-3  # an ordinary model keeps moving its state
    assert 0 < stats["dist_from_input"] and 0 < stats["dist_from_init"]
    # ln_f puts every token on (nearly) the same ellipsoid: |ln_f(s)| ~ sqrt(E) * rms(gain)
    gain_rms = model.transformer.ln_f.weight.pow(2).mean().sqrt().item()
    assert stats["state_norm"] == pytest.approx(math.sqrt(32) * gain_rms, rel=0.1)
    assert -0.5 < stats["latent_token_corr"] < 0.95 and -0.5 < stats["hidden_token_corr"] < 0.95
    assert collapse_warning(stats) is None


def test_trace_reproduces_the_model_forward():
    model = tiny_model(1)
    x = ids(seed=3)
    out = model(x, num_steps=(2, 1), state_seeds=[7, 8])
    trace = recurrence_trace(model, x, 2, 1, state_seeds=[7, 8])
    torch.testing.assert_close(trace.latent, out.latent.detach())
    torch.testing.assert_close(model.lm_head(trace.hidden).float(), out.logits.detach())
    # rel_residual compares s_r with s_{r-1}, both un-normed: recompute it from the trace by hand
    s_prev = model.core_step(model.core_step(trace.s0, trace.e), trace.e)
    torch.testing.assert_close(trace.s_prev, s_prev.detach())
    manual = ((trace.s - s_prev).norm(dim=-1) / trace.s.norm(dim=-1)).mean().item()
    stats = recurrence_stats(model, x, 2, 1, state_seeds=[7, 8])
    assert stats["rel_residual"] == pytest.approx(manual, rel=1e-5)
    assert stats["state_norm"] == pytest.approx(out.latent.norm(dim=-1).mean().item(), rel=1e-5)
    rel_input = ((trace.s - trace.e).norm(dim=-1) / trace.e.norm(dim=-1)).mean().item()
    assert stats["dist_from_input"] == pytest.approx(rel_input, rel=1e-5)


def test_state_independent_core_is_an_exact_fixed_point():
    """Adapter [0 | I]: the core sees only e, so s_i = core(e) for every i >= 1: s_r == s_{r-1} exactly."""
    model = tiny_model(2)
    E = model.args.n_embd
    with torch.no_grad():
        model.transformer.adapter.weight.copy_(torch.cat([torch.zeros(E, E), torch.eye(E)], dim=1))
    stats = recurrence_stats(model, ids(), 1, 1, state_seeds=[1, 2])
    assert stats["rel_residual"] == 0.0
    assert recurrence_stats(model, ids(), 0, 1, state_seeds=[1, 2])["rel_residual"] > 0.1  # s_1 vs s_0


def test_norm_only_core_is_a_fixed_point():
    """Adapter [I | 0] and zeroed attention/MLP output projections: each sandwich block is then
    x -> norm_4(norm_2(x)), and with unit gains RMSNorm is idempotent (up to eps), so s_2 == s_1."""
    model = tiny_model(3)
    E = model.args.n_embd
    with torch.no_grad():
        model.transformer.adapter.weight.copy_(torch.cat([torch.eye(E), torch.zeros(E, E)], dim=1))
        for name, p in model.transformer.core_block.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                p.zero_()
            elif ".norm_" in name:
                p.fill_(1.0)
    assert recurrence_stats(model, ids(), 3, 1, state_seeds=[1, 2])["rel_residual"] < 1e-5
    # with non-uniform gains the same core is no longer idempotent: the residual is visible again
    with torch.no_grad():
        model.transformer.core_block[-1].norm_4.weight[: E // 2] = 2.0
    assert recurrence_stats(model, ids(), 3, 1, state_seeds=[1, 2])["rel_residual"] > 1e-3


def test_zero_depth_has_no_residual():
    stats = recurrence_stats(tiny_model(4), ids(), 0, 0, state_seeds=[1, 2])
    assert math.isnan(stats["rel_residual"]) and stats["dist_from_init"] == 0.0


def test_collapsed_model_reports_correlation_one_and_warns():
    """One token id per sequence makes every prelude value vector the same, so attention (whatever its
    weights) returns the same vector at every position: e is identical across tokens. With the adapter
    [0 | I] the (random, per-token) state is ignored, so latent and hidden collapse too."""
    model = tiny_model(4)
    E = model.args.n_embd
    with torch.no_grad():
        model.transformer.adapter.weight.copy_(torch.cat([torch.zeros(E, E), torch.eye(E)], dim=1))
    x = torch.tensor([[7] * 12, [42] * 12])
    stats = recurrence_stats(model, x, 2, 1, state_seeds=[1, 2])
    assert stats["latent_token_corr"] == pytest.approx(1.0, abs=1e-5)
    assert stats["hidden_token_corr"] == pytest.approx(1.0, abs=1e-5)
    msg = collapse_warning(stats)
    assert msg is not None and "latent state" in msg and "last hidden state" in msg and "\n" not in msg
    # the same model on ordinary text is not collapsed
    assert recurrence_stats(model, ids(), 2, 1, state_seeds=[1, 2])["latent_token_corr"] < 0.95
    only_hidden = collapse_warning({"latent_token_corr": 0.5, "hidden_token_corr": 0.99}, threshold=0.95)
    assert only_hidden is not None and "latent" not in only_hidden
    assert collapse_warning({"latent_token_corr": 0.5, "hidden_token_corr": 0.9}) is None


def test_telemetry_leaves_training_state_untouched():
    model = tiny_model(5)
    x = ids()
    model(x, num_steps=(1, 1)).logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    stats = recurrence_stats(model, x, 2, 2)  # no seeds: noise from a forked global RNG
    assert all(math.isfinite(v) for v in stats.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n])


# ---- optimizer statistics ---------------------------------------------------------------------------------


def test_sgd_update_stats_match_hand_computation():
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |a| = 5
    b = torch.nn.Parameter(torch.ones(2, 2))  # |b| = 2
    c = torch.nn.Parameter(torch.tensor([1.0]))  # no gradient: not part of the statistics
    a.grad = torch.tensor([0.6, 0.8])  # |g_a| = 1
    b.grad = torch.full((2, 2), 1.0)  # |g_b| = 2
    opt = torch.optim.SGD([{"params": [a, c], "name": "first"}, {"params": [b]}], lr=0.1)
    before = snapshot_params(opt)
    opt.step()
    s = update_stats(opt, before)
    # group "first": g = [0.6, 0.8], N = 2, p = [3, 4]
    assert s["first/grad_norm"] == pytest.approx(1.0)
    assert s["first/param_norm"] == pytest.approx(5.0)
    assert s["first/update_rms"] == pytest.approx(0.1 * 1.0 / math.sqrt(2))
    assert s["first/rel_update"] == pytest.approx(0.1 * 1.0 / 5.0)
    assert s["first/update_per_lr"] == pytest.approx(1.0 / math.sqrt(2))  # gradient RMS
    assert s["first/eff_lr"] == pytest.approx(0.1)
    assert s["first/lr"] == pytest.approx(0.1)
    # unnamed group 1: g = ones(2, 2) -> |g| = 2, N = 4, |p| = 2
    assert s["group1/grad_norm"] == pytest.approx(2.0)
    assert s["group1/update_rms"] == pytest.approx(0.1 * 2.0 / 2.0)
    assert s["group1/rel_update"] == pytest.approx(0.1 * 2.0 / 2.0)
    assert s["group1/eff_lr"] == pytest.approx(0.1)
    assert update_stats(opt, before, lr=0.05)["first/update_per_lr"] == pytest.approx(math.sqrt(2))
    assert len(s) == 14


def test_adam_first_step_moves_lr_per_coordinate():
    """Adam's first step is -lr * g / (|g| + eps) = -lr * sign(g): update RMS = lr, |Dp| = lr sqrt(N)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    p.grad = torch.tensor([0.5, -0.25, 2.0, 1.0])
    opt = torch.optim.AdamW([p], lr=1e-2, eps=1e-12, weight_decay=0.0)
    before = snapshot_params(opt)
    opt.step()
    s = update_stats(opt, before)
    g_norm = math.sqrt(0.25 + 0.0625 + 4.0 + 1.0)
    assert s["group0/update_rms"] == pytest.approx(1e-2, rel=1e-5)
    assert s["group0/update_per_lr"] == pytest.approx(1.0, rel=1e-5)
    assert s["group0/eff_lr"] == pytest.approx(1e-2 * 2.0 / g_norm, rel=1e-5)
    assert s["group0/rel_update"] == pytest.approx(1e-2 * 2.0 / math.sqrt(1 + 4 + 9 + 0.25), rel=1e-5)


def test_group_grad_norms_on_the_model_are_pre_clip_and_match_manual():
    model = tiny_model(6)
    x = ids()
    F.cross_entropy(model(x, num_steps=(1, 1)).logits.flatten(0, 1), x.flatten()).backward()
    groups = build_param_groups(model, 0.1, True)
    manual = {g["name"]: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in g["params"])) for g in groups}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    before = snapshot_params(opt, device="cpu")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # after the snapshot: does not change it
    opt.step()
    s = update_stats(opt, before)
    assert {k.split("/")[0] for k in s} == {"weights", "embedding", "norm_bias"}
    for name, norm in manual.items():
        assert s[f"{name}/grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert s[f"{name}/update_rms"] > 0 and math.isfinite(s[f"{name}/eff_lr"])
