"""Exact KL, entropy, the sample estimators k1/k2/k3 and their placements (advantage.objectives.kl)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.kl import (
    categorical_entropy,
    categorical_kl,
    gaussian_entropy,
    gaussian_kl,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss_term,
    kl_reward_penalty,
)

D = torch.float64
HYP = settings(max_examples=50, deadline=None)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


# --------------------------------------------------------------------------------------------------------------------
# exact KL and entropy
# --------------------------------------------------------------------------------------------------------------------

def test_categorical_kl_hand_value():
    # p = (0.5, 0.5), q = (0.25, 0.75):
    # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75) = 0.5 log 2 + 0.5 log(2/3) = 0.5 log(4/3) = 0.1438410362
    kl = categorical_kl(t([0.5, 0.5]).log(), t([0.25, 0.75]).log())
    assert_close(kl, t(0.5 * math.log(4.0 / 3.0)))
    assert_close(kl, t(0.1438410362258904))
    # logits are only defined up to a constant: shifting them changes nothing
    assert_close(categorical_kl(t([0.5, 0.5]).log() + 3.0, t([0.25, 0.75]).log() - 7.0), kl)


def test_categorical_kl_matches_sum_p_log_p_over_q_and_is_asymmetric():
    gen = torch.Generator().manual_seed(3)
    logits_p = torch.randn(6, 5, dtype=D, generator=gen)
    logits_q = torch.randn(6, 5, dtype=D, generator=gen)
    p, q = logits_p.softmax(-1), logits_q.softmax(-1)
    expected = (p * (p / q).log()).sum(-1)
    assert_close(categorical_kl(logits_p, logits_q), expected)
    reverse = (q * (q / p).log()).sum(-1)
    assert_close(categorical_kl(logits_q, logits_p), reverse)
    assert not torch.allclose(expected, reverse)
    assert torch.all(expected > 0)
    # KL(p || p) = 0
    assert_close(categorical_kl(logits_p, logits_p), torch.zeros(6, dtype=D))


def test_gaussian_kl_hand_value():
    # dim 1: m_p=0, s_p=1, m_q=1, s_q=2: log(2/1) + (1 + 1)/(2*4) - 1/2 = 0.693147 + 0.25 - 0.5 = 0.443147
    # dim 2: identical Gaussians (m=1, s=0.5): 0
    kl = gaussian_kl(t([0.0, 1.0]), t([0.0, math.log(0.5)]), t([1.0, 1.0]), t([math.log(2.0), math.log(0.5)]))
    assert_close(kl, t(math.log(2.0) - 0.25))
    assert kl.shape == ()


def test_gaussian_kl_matches_closed_form():
    gen = torch.Generator().manual_seed(4)
    mp, mq = torch.randn(7, 3, dtype=D, generator=gen), torch.randn(7, 3, dtype=D, generator=gen)
    lsp, lsq = 0.5 * torch.randn(7, 3, dtype=D, generator=gen), 0.5 * torch.randn(7, 3, dtype=D, generator=gen)
    sp, sq = lsp.exp(), lsq.exp()
    per_dim = (sq / sp).log() + (sp ** 2 + (mp - mq) ** 2) / (2 * sq ** 2) - 0.5
    assert_close(gaussian_kl(mp, lsp, mq, lsq), per_dim.sum(-1))
    assert_close(gaussian_kl(mp, lsp, mp, lsp), torch.zeros(7, dtype=D))


def test_gaussian_kl_matches_numerical_integral():
    # 1-D KL(p || q) = integral p(x) log(p(x)/q(x)) dx, by the trapezoid rule on a fine grid
    mp, sp, mq, sq = 0.3, 0.7, -0.5, 1.3
    x = torch.linspace(-12, 12, 200_001, dtype=D)
    logp = -0.5 * ((x - mp) / sp) ** 2 - math.log(sp * math.sqrt(2 * math.pi))
    logq = -0.5 * ((x - mq) / sq) ** 2 - math.log(sq * math.sqrt(2 * math.pi))
    integral = torch.trapezoid(logp.exp() * (logp - logq), x)
    kl = gaussian_kl(t([mp]), t([math.log(sp)]), t([mq]), t([math.log(sq)]))
    assert_close(kl, integral, atol=1e-8, rtol=1e-8)


def test_entropy_values():
    # uniform over A actions: log A
    for a in (1, 2, 5, 17):
        assert_close(categorical_entropy(torch.zeros(a, dtype=D)), t(math.log(a)))
    # (0.5, 0.25, 0.25): 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2
    assert_close(categorical_entropy(t([0.5, 0.25, 0.25]).log()), t(1.5 * math.log(2.0)))
    # a near-deterministic policy has ~0 entropy
    assert categorical_entropy(t([0.0, -50.0, -50.0])).item() < 1e-18
    # diagonal Gaussian, log std (0, log 2): 2 * 1/2 log(2 pi e) + 0 + log 2
    assert_close(gaussian_entropy(t([0.0, math.log(2.0)])), t(math.log(2 * math.pi * math.e) + math.log(2.0)))
    # against torch.distributions
    ls = t([[0.3, -1.2, 0.0], [2.0, 0.1, -0.4]])
    expected = torch.distributions.Normal(torch.zeros_like(ls), ls.exp()).entropy().sum(-1)
    assert_close(gaussian_entropy(ls), expected)


# --------------------------------------------------------------------------------------------------------------------
# sample estimators
# --------------------------------------------------------------------------------------------------------------------

def test_estimators_hand_values():
    # pi(a) = 0.5, pi_ref(a) = 0.25: r = pi_ref/pi = 0.5
    # k1 = -log r = log 2 = 0.693147
    # k2 = 1/2 (log r)^2 = 1/2 (log 2)^2 = 0.240227
    # k3 = (r - 1) - log r = -0.5 + log 2 = 0.193147
    lp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert_close(kl_k1(lp, ref), t([math.log(2.0)]))
    assert_close(kl_k2(lp, ref), t([0.5 * math.log(2.0) ** 2]))
    assert_close(kl_k3(lp, ref), t([-0.5 + math.log(2.0)]))
    # r = 2 (pi_ref larger): k1 = -log 2 < 0, k2 = 1/2 (log 2)^2, k3 = 1 - log 2
    assert_close(kl_k1(ref, lp), t([-math.log(2.0)]))
    assert_close(kl_k2(ref, lp), t([0.5 * math.log(2.0) ** 2]))
    assert_close(kl_k3(ref, lp), t([1.0 - math.log(2.0)]))
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert_close(kl_estimate(lp, ref, name), fn(lp, ref))
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")
    # all three are 0 where pi = pi_ref
    for name in ("k1", "k2", "k3"):
        assert_close(kl_estimate(lp, lp, name), t([0.0]))


@HYP
@given(pairs=st.lists(st.tuples(st.floats(-30.0, 0.0), st.floats(-30.0, 0.0)), min_size=1, max_size=40))
def test_k2_and_k3_are_never_negative(pairs):
    lp = t([a for a, _ in pairs])
    ref = t([b for _, b in pairs])
    assert torch.all(kl_k2(lp, ref) >= 0)
    assert torch.all(kl_k3(lp, ref) >= 0)
    # k3 = 0 only where the log-probabilities agree (log r <= r - 1 with equality only at r = 1)
    k3 = kl_k3(lp, ref)
    assert torch.all((k3 > 0) | ((lp - ref).abs() < 1e-6))


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_monte_carlo_means_of_estimators(scale):
    gen = torch.Generator().manual_seed(2024)
    num_actions, n = 6, 200_000
    logits = torch.randn(num_actions, dtype=D, generator=gen) * scale
    ref_logits = torch.randn(num_actions, dtype=D, generator=gen) * scale
    log_pi, log_ref = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    exact = categorical_kl(logits, ref_logits)
    a = torch.multinomial(log_pi.exp(), n, replacement=True, generator=gen)  # a ~ pi
    lp, ref = log_pi[a], log_ref[a]
    for name in ("k1", "k3"):
        k = kl_estimate(lp, ref, name)
        se = k.std() / math.sqrt(n)
        assert abs(k.mean() - exact) < 4 * se, (name, k.mean(), exact, se)
    if scale == 0.5:
        # close distributions: k3 has lower variance than k1 (both unbiased); far apart this can reverse
        assert kl_k3(lp, ref).var() < kl_k1(lp, ref).var()
    k2 = kl_k2(lp, ref)
    se2 = k2.std() / math.sqrt(n)
    # E[k2] computed exactly by enumeration: differs from the KL (k2 is biased)
    exact_k2_mean = (log_pi.exp() * 0.5 * (log_ref - log_pi) ** 2).sum()
    assert abs(k2.mean() - exact_k2_mean) < 4 * se2
    if scale == 2.0:
        # far apart: the bias is many standard errors and a sizeable share of the KL
        assert abs(k2.mean() - exact) > 10 * se2
        assert abs(exact_k2_mean - exact) > 0.05 * exact


def test_k2_is_second_order_accurate_when_close():
    # for pi_ref -> pi, E[k2] / KL -> 1
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, dtype=D, generator=gen)
    direction = torch.randn(5, dtype=D, generator=gen)
    log_pi = logits.log_softmax(-1)
    for h, tol in ((1e-1, 0.2), (1e-3, 2e-3)):
        log_ref = (logits + h * direction).log_softmax(-1)
        exact = (log_pi.exp() * (log_pi - log_ref)).sum()
        e_k2 = (log_pi.exp() * 0.5 * (log_ref - log_pi) ** 2).sum()
        assert abs(e_k2 / exact - 1) < tol


# --------------------------------------------------------------------------------------------------------------------
# placements
# --------------------------------------------------------------------------------------------------------------------

def test_kl_reward_penalty_is_detached_minus_beta_k():
    lp = t([math.log(0.5), math.log(0.1)]).requires_grad_()
    ref = t([math.log(0.25), math.log(0.2)]).requires_grad_()
    for name in ("k1", "k2", "k3"):
        pen = kl_reward_penalty(lp, ref, 0.3, name)
        assert not pen.requires_grad
        assert_close(pen, -0.3 * kl_estimate(lp.detach(), ref.detach(), name))
    # default k1: -beta log(pi/pi_ref) = -0.3 * (log 2, log 0.5) = (-0.207944, 0.207944)
    assert_close(kl_reward_penalty(lp, ref, 0.3), t([-0.3 * math.log(2.0), 0.3 * math.log(2.0)]))


def test_kl_loss_term_hand_gradients():
    # pi(a) = 0.5, pi_ref(a) = 0.25, r = 0.5, beta = 2; x = log pi
    # k3 = e^{ref - x} - 1 - (ref - x); dk3/dx = 1 - r = 0.5 -> loss gradient beta * 0.5 = 1.0
    # k2 = 1/2 (ref - x)^2; dk2/dx = x - ref = log 2 -> gradient 2 log 2
    # k1 = x - ref; dk1/dx = 1 -> gradient 2
    for name, expected_grad in (("k3", 1.0), ("k2", 2 * math.log(2.0)), ("k1", 2.0)):
        lp = t([math.log(0.5)]).requires_grad_()
        ref = t([math.log(0.25)]).requires_grad_()
        term = kl_loss_term(lp, ref, 2.0, name)
        assert_close(term.detach(), 2.0 * kl_estimate(lp.detach(), ref.detach(), name))
        term.sum().backward()
        assert_close(lp.grad, t([expected_grad]))
        assert ref.grad is None  # the reference model is frozen


def test_kl_loss_term_weighted_by_ratio():
    # with old_log_probs == log_probs: the ratio is 1, so the value is unchanged; but its derivative
    # d(pi/pi_old)/dx = 1 adds the score-function term k: gradient beta (dk/dx + k).
    # k3: beta (1 - r + (r - 1) - log r) = beta (-log r) = 2 log 2 = 1.386294 (vs 1.0 unweighted)
    # k1: beta (1 + k1) = 2 (1 + log 2)
    for name, plain_grad, weighted_grad in (("k3", 1.0, 2 * math.log(2.0)), ("k1", 2.0, 2 * (1 + math.log(2.0)))):
        lp = t([math.log(0.5)]).requires_grad_()
        ref = t([math.log(0.25)])
        plain = kl_loss_term(lp, ref, 2.0, name)
        weighted = kl_loss_term(lp, ref, 2.0, name, old_log_probs=lp.detach().clone())
        assert_close(weighted.detach(), plain.detach())
        (g_plain,) = torch.autograd.grad(plain.sum(), lp)
        (g_weighted,) = torch.autograd.grad(weighted.sum(), lp)
        assert_close(g_plain, t([plain_grad]))
        assert_close(g_weighted, t([weighted_grad]))
    # with a different old policy the value is multiplied by pi/pi_old
    lp = t([math.log(0.5)])
    ref = t([math.log(0.25)])
    old = t([math.log(0.25)])
    assert_close(kl_loss_term(lp, ref, 2.0, "k3", old_log_probs=old), 2.0 * kl_k3(lp, ref) * 2.0)


def test_placement_gradients_in_expectation():
    # Enumerate a categorical pi (logits theta) and pi_ref: E_{a~pi}[grad of each placement] vs grad KL(pi || ref).
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, dtype=D, generator=gen).requires_grad_()
    ref_logits = torch.randn(5, dtype=D, generator=gen)
    log_ref = ref_logits.log_softmax(-1)
    (true_grad,) = torch.autograd.grad(categorical_kl(logits, ref_logits), logits)
    (reverse_grad,) = torch.autograd.grad(categorical_kl(ref_logits, logits), logits)

    def expected_grad(term_fn):
        log_pi = logits.log_softmax(-1)
        probs = log_pi.exp().detach()
        total = (probs * term_fn(log_pi)).sum()  # sum_a pi(a) * grad term(a), pi held as sampling weights
        return torch.autograd.grad(total, logits)[0]

    # "reward" placement with k1: score function E[k1 grad log pi]
    g = expected_grad(lambda lp: -kl_reward_penalty(lp, log_ref, 1.0, "k1") * lp)
    assert_close(g, true_grad)
    # "loss" placement: k2 unbiased, k3 follows the reverse KL, k1 gives zero
    assert_close(expected_grad(lambda lp: kl_loss_term(lp, log_ref, 1.0, "k2")), true_grad)
    assert_close(expected_grad(lambda lp: kl_loss_term(lp, log_ref, 1.0, "k3")), reverse_grad)
    assert_close(expected_grad(lambda lp: kl_loss_term(lp, log_ref, 1.0, "k1")), torch.zeros(5, dtype=D))
    # "loss_weighted": k1 and k3 unbiased
    for name in ("k1", "k3"):
        g = expected_grad(lambda lp: kl_loss_term(lp, log_ref, 1.0, name, old_log_probs=lp.detach()))
        assert_close(g, true_grad)
    assert not torch.allclose(true_grad, reverse_grad)
