"""Importance sampling, L^CPI, PPO-clip, PPO-penalty and the adaptive KL coefficient (advantage.objectives.ppo)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.policy_gradient import policy_gradient_loss
from advantage.objectives.ppo import (
    adaptive_kl_beta,
    clipped_surrogate_loss,
    clipped_surrogate_terms,
    cpi_loss,
    importance_ratio,
    importance_sampling_estimate,
    kl_penalty_surrogate_loss,
    surrogate_stats,
)

D = torch.float64
HYP = settings(max_examples=50, deadline=None)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


# --------------------------------------------------------------------------------------------------------------------
# importance ratio and importance sampling
# --------------------------------------------------------------------------------------------------------------------

def test_importance_ratio_hand_values_and_old_is_data():
    # r = exp(log pi - log pi_old): exp(log 0.6 - log 0.3) = 2, exp(log 0.1 - log 0.4) = 0.25
    log_probs = t([math.log(0.6), math.log(0.1)]).requires_grad_()
    old = t([math.log(0.3), math.log(0.4)]).requires_grad_()
    ratio = importance_ratio(log_probs, old)
    assert_close(ratio, t([2.0, 0.25]))
    ratio.sum().backward()
    # d r / d log pi = r; pi_old is data, so it gets no gradient
    assert_close(log_probs.grad, t([2.0, 0.25]))
    assert old.grad is None


def test_importance_sampling_estimate_hand_value():
    # two samples x1, x2 from q = (0.5, 0.5); p(x1) = 0.2, p(x2) = 0.8; f = (1, 2)
    # weights p/q = (0.4, 1.6); f * w = (0.4, 3.2); mean = 1.8
    est = importance_sampling_estimate(t([1.0, 2.0]), t([0.2, 0.8]).log(), t([0.5, 0.5]).log())
    assert_close(est, t(1.8))


def _categorical_setup():
    p = t([0.1, 0.2, 0.3, 0.4])
    f = t([1.0, -2.0, 3.0, 0.5])
    exact = (p * f).sum()  # 0.1 - 0.4 + 0.9 + 0.2 = 0.8
    return p, f, exact


def test_importance_sampling_monte_carlo_is_unbiased():
    p, f, exact = _categorical_setup()
    assert_close(exact, t(0.8))
    gen = torch.Generator().manual_seed(1234)
    n = 100_000
    for q in (t([0.25, 0.25, 0.25, 0.25]), t([0.4, 0.3, 0.2, 0.1]), t([0.7, 0.1, 0.1, 0.1])):
        x = torch.multinomial(q, n, replacement=True, generator=gen)
        est = importance_sampling_estimate(f[x], p.log()[x], q.log()[x])
        # standard error of the mean of f(x) p(x)/q(x), x ~ q: sqrt(Var_q / n), with the exact variance
        # Var_q[f p/q] = sum_x f^2 p^2 / q - (E_p f)^2
        var = (f ** 2 * p ** 2 / q).sum() - exact ** 2
        se = math.sqrt(var.item() / n)
        assert abs(est.item() - exact.item()) < 4 * se, (q, est, exact, se)


def test_importance_sampling_variance_grows_as_q_moves_away_from_p():
    # Seed 004: only the mean is preserved. Estimate the variance of the estimator empirically from R
    # independent batches of N samples (columns), and compare with the exact Var_q[f p/q] / N.
    p, f, exact = _categorical_setup()
    gen = torch.Generator().manual_seed(99)
    n, repeats = 20, 4000
    empirical, exact_vars = [], []
    for lam in (0.0, 0.5, 0.8, 0.95):
        # q moves from p (lam = 0) towards a distribution putting little mass where p is large
        far = t([0.85, 0.1, 0.04, 0.01])
        q = (1 - lam) * p + lam * far
        x = torch.multinomial(q, n * repeats, replacement=True, generator=gen).reshape(n, repeats)
        estimates = importance_sampling_estimate(f[x], p.log()[x], q.log()[x])  # (repeats,)
        assert estimates.shape == (repeats,)
        # the mean is still right
        exact_var = ((f ** 2 * p ** 2 / q).sum() - exact ** 2).item() / n
        assert abs(estimates.mean().item() - exact.item()) < 5 * math.sqrt(exact_var / repeats)
        empirical.append(estimates.var().item())
        exact_vars.append(exact_var)
    # at q = p the weights are 1: the variance is Var_p[f] / n exactly
    assert_close(torch.tensor(exact_vars[0], dtype=D), ((p * f ** 2).sum() - exact ** 2) / n)
    for emp, ex in zip(empirical, exact_vars):
        assert emp == pytest.approx(ex, rel=0.15)
    assert all(a < b for a, b in zip(exact_vars, exact_vars[1:]))
    assert all(a < b for a, b in zip(empirical, empirical[1:]))
    assert empirical[-1] > 5 * empirical[0]


# --------------------------------------------------------------------------------------------------------------------
# L^CPI
# --------------------------------------------------------------------------------------------------------------------

def test_cpi_loss_hand_value():
    # ratios (2, 0.5), advantages (1, 3): -mean(2*1, 0.5*3) = -(2 + 1.5)/2 = -1.75
    log_probs = t([math.log(2.0), math.log(0.5)])
    assert_close(cpi_loss(log_probs, t([0.0, 0.0]), t([1.0, 3.0])), t(-1.75))
    # masked: only the first element: -2
    assert_close(cpi_loss(log_probs, t([0.0, 0.0]), t([1.0, 3.0]), mask=t([1.0, 0.0])), t(-2.0))


def test_cpi_gradient_at_ratio_one_equals_policy_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, dtype=D, generator=gen, requires_grad=True)
    actions = torch.randint(0, 5, (8,), generator=gen)
    adv = torch.randn(8, dtype=D, generator=gen)
    log_probs = torch.log_softmax(logits, -1)[torch.arange(8), actions]
    old = log_probs.detach()
    (g_cpi,) = torch.autograd.grad(cpi_loss(log_probs, old, adv), logits, retain_graph=True)
    (g_pg,) = torch.autograd.grad(policy_gradient_loss(log_probs, adv), logits, retain_graph=True)
    # explicit -mean(A log pi) too
    (g_ref,) = torch.autograd.grad(-(adv * log_probs).mean(), logits)
    assert_close(g_cpi, g_pg)
    assert_close(g_cpi, g_ref)
    assert g_cpi.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# PPO-clip
# --------------------------------------------------------------------------------------------------------------------

def test_clipped_surrogate_terms_hand_values():
    # eps = 0.2, clip range [0.8, 1.2]; term = -min(r A, clip(r) A)
    # r=0.5, A= 1: min(0.5, 0.8)   = 0.5  -> -0.5
    # r=1.0, A= 2: min(2, 2)       = 2    -> -2
    # r=1.5, A= 1: min(1.5, 1.2)   = 1.2  -> -1.2
    # r=1.5, A=-1: min(-1.5, -1.2) = -1.5 ->  1.5
    # r=0.5, A=-1: min(-0.5, -0.8) = -0.8 ->  0.8
    ratio = t([0.5, 1.0, 1.5, 1.5, 0.5])
    adv = t([1.0, 2.0, 1.0, -1.0, -1.0])
    assert_close(clipped_surrogate_terms(ratio, adv, 0.2), t([-0.5, -2.0, -1.2, 1.5, 0.8]))
    # clip-higher: upper bound 1 + 0.28: r=1.5, A=1 -> min(1.5, 1.28) = 1.28; lower side unchanged
    assert_close(clipped_surrogate_terms(ratio, adv, 0.2, 0.28), t([-0.5, -2.0, -1.28, 1.5, 0.8]))
    with pytest.raises(ValueError):
        clipped_surrogate_terms(ratio, adv, -0.1)
    with pytest.raises(ValueError):
        clipped_surrogate_terms(ratio, adv, 0.1, -0.1)


def test_clipped_surrogate_loss_and_stats_hand_values():
    ratio = [0.5, 1.0, 1.5, 1.5, 0.5]
    log_probs = t([math.log(r) for r in ratio])
    old = torch.zeros(5, dtype=D)
    adv = t([1.0, 2.0, 1.0, -1.0, -1.0])
    loss, stats = clipped_surrogate_loss(log_probs, old, adv, 0.2)
    # terms (-0.5, -2, -1.2, 1.5, 0.8), sum -1.4, mean -0.28
    assert_close(loss, t(-0.28))
    # clipped branch active at (r=1.5, A=1) and (r=0.5, A=-1): 2 of 5
    assert_close(stats.clip_fraction, t(0.4))
    # approx_kl = mean((r - 1) - log r) = [2 (-0.5 + log 2) + 0 + 2 (0.5 - log 1.5)] / 5
    expected_kl = (2 * (-0.5 + math.log(2)) + 2 * (0.5 - math.log(1.5))) / 5
    assert_close(stats.approx_kl, t(expected_kl))
    # ratio_mean = (0.5 + 1 + 1.5 + 1.5 + 0.5) / 5 = 1
    assert_close(stats.ratio_mean, t(1.0))
    # with a mask keeping elements 0, 2, 4: terms (-0.5, -1.2, 0.8) -> -0.9/3 = -0.3; clipped 2 of 3
    mask = t([1.0, 0.0, 1.0, 0.0, 1.0])
    loss_m, stats_m = clipped_surrogate_loss(log_probs, old, adv, 0.2, mask=mask)
    assert_close(loss_m, t(-0.3))
    assert_close(stats_m.clip_fraction, t(2.0 / 3.0))
    assert_close(stats_m.ratio_mean, t((0.5 + 1.5 + 0.5) / 3))
    # approx_kl (k3) on ratios (0.5, 1.5, 0.5): [2 (-0.5 + log 2) + (0.5 - log 1.5)] / 3 = 0.1602764
    assert_close(stats_m.approx_kl, t((2 * (-0.5 + math.log(2)) + (0.5 - math.log(1.5))) / 3))
    assert_close(stats_m.approx_kl, t(0.1602764), atol=1e-7, rtol=0)


@HYP
@given(
    log_ratio=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=30),
    adv_seed=st.integers(0, 2 ** 31 - 1),
    eps=st.floats(0.05, 0.5),
)
def test_clipped_surrogate_gradient_property(log_ratio, adv_seed, eps):
    n = len(log_ratio)
    gen = torch.Generator().manual_seed(adv_seed)
    adv = torch.randn(n, dtype=D, generator=gen)
    adv[torch.rand(n, generator=gen) < 0.1] = 0.0
    old = torch.randn(n, dtype=D, generator=gen)
    log_probs = (old + t(log_ratio)).requires_grad_()
    ratio = importance_ratio(log_probs, old)
    terms = clipped_surrogate_terms(ratio, adv, eps)
    (grad,) = torch.autograd.grad(terms.sum(), log_probs)
    r = ratio.detach()
    inside = (r >= 1 - eps) & (r <= 1 + eps)
    clipped_active = ((r > 1 + eps) & (adv > 0)) | ((r < 1 - eps) & (adv < 0))
    # inside the trust interval the term is exactly the unclipped -r A
    assert_close(terms.detach()[inside], (-r * adv)[inside])
    # where the clipped branch is the minimum the term is the constant -clip(r) A with zero gradient
    assert torch.all(grad[clipped_active] == 0.0)
    assert_close(terms.detach()[clipped_active], (-r.clamp(1 - eps, 1 + eps) * adv)[clipped_active])
    # everywhere else: d(-r A)/d log pi = -r A
    assert_close(grad[~clipped_active], (-r * adv)[~clipped_active])
    # the reported clip fraction counts exactly the zero-gradient elements
    stats = surrogate_stats(log_probs.detach(), old, adv, eps)
    assert_close(stats.clip_fraction, clipped_active.to(D).mean())
    # and the loss is never below the unclipped one (it is a pessimistic bound)
    assert torch.all(terms.detach() >= -r * adv - 1e-12)


def test_clipped_surrogate_loss_gradient_masked_mean():
    # gradient of the token-mean loss is (-r A / n_real) on real, unclipped elements, 0 elsewhere
    log_probs = t([math.log(1.1), math.log(1.5), math.log(0.9), 0.0]).requires_grad_()
    adv = t([2.0, 1.0, -1.0, 5.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    loss, _ = clipped_surrogate_loss(log_probs, torch.zeros(4, dtype=D), adv, 0.2, mask=mask)
    loss.backward()
    # element 0: r=1.1 inside -> -1.1*2/3; element 1: r=1.5, A>0 clipped -> 0; element 2: r=0.9 inside -> 0.9/3
    assert_close(log_probs.grad, t([-2.2 / 3, 0.0, 0.9 / 3, 0.0]))


# --------------------------------------------------------------------------------------------------------------------
# PPO-penalty
# --------------------------------------------------------------------------------------------------------------------

def test_kl_penalty_surrogate_loss_hand_value():
    # ratios (2, 0.5), A (1, 3), kl (0.1, 0.3), beta 0.5:
    # -mean(2, 1.5) + 0.5 * mean(0.1, 0.3) = -1.75 + 0.1 = -1.65
    log_probs = t([math.log(2.0), math.log(0.5)]).requires_grad_()
    kl = t([0.1, 0.3]).requires_grad_()
    loss = kl_penalty_surrogate_loss(log_probs, torch.zeros(2, dtype=D), t([1.0, 3.0]), kl, beta=0.5)
    assert_close(loss, t(-1.65))
    loss.backward()
    # d/d log pi = -r A / 2 = (-1, -0.75); d/d kl = beta / 2 = 0.25
    assert_close(log_probs.grad, t([-1.0, -0.75]))
    assert_close(kl.grad, t([0.25, 0.25]))
    # masked to the first element: -2 + 0.5 * 0.1 = -1.95
    loss_m = kl_penalty_surrogate_loss(log_probs, torch.zeros(2, dtype=D), t([1.0, 3.0]), kl, 0.5, mask=t([1.0, 0.0]))
    assert_close(loss_m, t(-1.95))


def test_adaptive_kl_beta_hand_values():
    # target 1: halve below 1/1.5 = 0.667, double above 1.5
    assert adaptive_kl_beta(1.0, 0.5, 1.0) == 0.5
    assert adaptive_kl_beta(1.0, 2.0, 1.0) == 2.0
    assert adaptive_kl_beta(1.0, 1.0, 1.0) == 1.0
    assert adaptive_kl_beta(1.0, 1.5, 1.0) == 1.0  # 1.5 is not > 1.5
    assert adaptive_kl_beta(1.0, 0.7, 1.0) == 1.0  # 0.7 >= 0.667
    assert adaptive_kl_beta(0.3, 0.0, 0.01) == 0.15
    with pytest.raises(ValueError):
        adaptive_kl_beta(1.0, 0.5, 0.0)
    with pytest.raises(ValueError):
        adaptive_kl_beta(1.0, 0.5, -0.1)


@HYP
@given(beta=st.floats(1e-4, 1e4), kl=st.floats(0.0, 10.0), target=st.floats(1e-4, 10.0))
def test_adaptive_kl_beta_one_point_five_rule(beta, kl, target):
    new = adaptive_kl_beta(beta, kl, target)
    if kl < target / 1.5:
        assert new == pytest.approx(beta / 2)
    elif kl > 1.5 * target:
        assert new == pytest.approx(beta * 2)
    else:
        assert new == beta


@HYP
@given(target=st.floats(1e-3, 1.0), ratio=st.floats(0.0, 10.0))
def test_adaptive_kl_beta_moves_beta_the_right_way(target, ratio):
    # beta grows only when the measured KL is too large, and shrinks only when it is too small
    kl = ratio * target
    new = adaptive_kl_beta(1.0, kl, target)
    if new > 1.0:
        assert kl > target
    if new < 1.0:
        assert kl < target
