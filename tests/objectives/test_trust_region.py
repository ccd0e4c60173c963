"""TRPO's machinery: conjugate gradient, Fisher-vector product, natural step, line search (trust_region)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.kl import categorical_kl
from advantage.objectives.trust_region import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    natural_gradient_step,
)

D = torch.float64
HYP = settings(max_examples=50, deadline=None)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def random_spd(n: int, gen: torch.Generator, low: float = 1.0, high: float = 20.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=gen))
    eigenvalues = low + (high - low) * torch.rand(n, dtype=D, generator=gen)
    return q @ torch.diag(eigenvalues) @ q.T


# --------------------------------------------------------------------------------------------------------------------
# flat_grad and conjugate gradient
# --------------------------------------------------------------------------------------------------------------------

def test_flat_grad_hand_value_and_unused_params():
    # f = a0^2 + 3 a1 b; grad_a = (2 a0, 3 b) = (2, 6), grad_b = 3 a1 = 6; c unused -> zeros
    a = t([1.0, 2.0]).requires_grad_()
    b = t(2.0).requires_grad_()
    c = torch.zeros(2, 2, dtype=D, requires_grad=True)
    g = flat_grad(a[0] ** 2 + 3 * a[1] * b, [a, b, c])
    assert_close(g, t([2.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0]))


def test_conjugate_gradient_hand_2x2():
    # A = [[4, 1], [1, 3]], b = (1, 2): x = A^{-1} b = (1/11, 7/11); CG converges in 2 iterations
    a = t([[4.0, 1.0], [1.0, 3.0]])
    x = conjugate_gradient(lambda v: a @ v, t([1.0, 2.0]), iterations=2)
    assert_close(x, t([1.0 / 11.0, 7.0 / 11.0]))
    # one iteration is only the steepest-descent step: x1 = (r.r / r.Ar) r = (5/20) (1, 2)
    x1 = conjugate_gradient(lambda v: a @ v, t([1.0, 2.0]), iterations=1)
    assert_close(x1, t([0.25, 0.5]))


@HYP
@given(n=st.integers(10, 30), seed=st.integers(0, 2 ** 31 - 1))
def test_conjugate_gradient_solves_random_spd(n, seed):
    gen = torch.Generator().manual_seed(seed)
    a = random_spd(n, gen)
    b = torch.randn(n, dtype=D, generator=gen)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=3 * n, residual_tolerance=1e-24)
    assert_close(a @ x, b, atol=1e-9, rtol=0)
    assert_close(x, torch.linalg.solve(a, b), atol=1e-9, rtol=1e-9)


def test_conjugate_gradient_converges_in_n_steps_for_few_distinct_eigenvalues():
    # with k distinct eigenvalues CG is exact after k iterations
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=D, generator=gen))
    eig = t([1.0, 4.0, 9.0] * 6 + [1.0, 4.0])
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(20, dtype=D, generator=gen)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=3)
    assert_close(x, torch.linalg.solve(a, b), atol=1e-9, rtol=1e-9)
    x2 = conjugate_gradient(lambda v: a @ v, b, iterations=2)
    assert not torch.allclose(x2, torch.linalg.solve(a, b), atol=1e-3)


def test_conjugate_gradient_zero_rhs():
    a = t([[2.0, 0.0], [0.0, 3.0]])
    assert_close(conjugate_gradient(lambda v: a @ v, torch.zeros(2, dtype=D)), torch.zeros(2, dtype=D))


# --------------------------------------------------------------------------------------------------------------------
# a small categorical policy: logits = states @ W^T + b
# --------------------------------------------------------------------------------------------------------------------

N_STATES, STATE_DIM, N_ACTIONS = 7, 3, 4
N_PARAMS = N_ACTIONS * STATE_DIM + N_ACTIONS


def policy_logits(theta: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    w = theta[: N_ACTIONS * STATE_DIM].reshape(N_ACTIONS, STATE_DIM)
    b = theta[N_ACTIONS * STATE_DIM:]
    return states @ w.T + b


def make_policy(seed: int):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(N_STATES, STATE_DIM, dtype=D, generator=gen)
    theta = 0.7 * torch.randn(N_PARAMS, dtype=D, generator=gen)
    return gen, states, theta


def mean_kl_from(theta_old: torch.Tensor, theta: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return categorical_kl(policy_logits(theta_old, states).detach(), policy_logits(theta, states)).mean()


def exact_fisher(theta: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    # F = E_s sum_a pi(a|s) grad log pi(a|s) grad log pi(a|s)^T, enumerating every action
    fisher = torch.zeros(N_PARAMS, N_PARAMS, dtype=D)
    th = theta.clone().requires_grad_()
    log_pi = policy_logits(th, states).log_softmax(-1)
    for s in range(N_STATES):
        for a in range(N_ACTIONS):
            (g,) = torch.autograd.grad(log_pi[s, a], th, retain_graph=True)
            fisher += log_pi[s, a].exp().detach() * torch.outer(g, g)
    return fisher / N_STATES


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fisher_vector_product_equals_kl_hessian_and_fisher_matrix(seed):
    gen, states, theta = make_policy(seed)
    theta_old = theta.clone()
    th = theta.clone().requires_grad_()
    fvp = fisher_vector_product(mean_kl_from(theta_old, th, states), [th])

    hessian = torch.autograd.functional.hessian(lambda p: mean_kl_from(theta_old, p, states), theta.clone())
    fisher = exact_fisher(theta, states)
    assert_close(hessian, fisher)  # at theta = theta_old the Hessian of the KL is the Fisher matrix
    for _ in range(4):
        v = torch.randn(N_PARAMS, dtype=D, generator=gen)
        fv = fvp(v)
        assert_close(fv, hessian @ v)
        assert_close(fv, fisher @ v)
    # damping adds damping * v
    fvp_damped = fisher_vector_product(mean_kl_from(theta_old, th, states), [th], damping=0.1)
    v = torch.randn(N_PARAMS, dtype=D, generator=gen)
    assert_close(fvp_damped(v), fisher @ v + 0.1 * v)
    # Fisher is PSD, with the "shift all logits" directions in its null space
    shift = torch.cat([torch.zeros(N_ACTIONS * STATE_DIM, dtype=D), torch.ones(N_ACTIONS, dtype=D)])
    assert_close(fvp(shift), torch.zeros(N_PARAMS, dtype=D), atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(fisher).min() > -1e-12


def test_fisher_vector_product_with_several_parameter_tensors():
    # the same policy as an nn.Linear: weight and bias are two parameter tensors, flattened in that order
    _, states, theta = make_policy(3)
    layer = torch.nn.Linear(STATE_DIM, N_ACTIONS).to(D)
    with torch.no_grad():
        layer.weight.copy_(theta[: N_ACTIONS * STATE_DIM].reshape(N_ACTIONS, STATE_DIM))
        layer.bias.copy_(theta[N_ACTIONS * STATE_DIM:])
    logits = layer(states)
    mean_kl = categorical_kl(logits.detach(), logits).mean()
    assert_close(mean_kl, t(0.0))
    fvp = fisher_vector_product(mean_kl, list(layer.parameters()))
    fisher = exact_fisher(theta, states)
    v = torch.randn(N_PARAMS, dtype=D, generator=torch.Generator().manual_seed(11))
    assert_close(fvp(v), fisher @ v)
    assert_close(fvp(2 * v), 2 * (fisher @ v))  # reusable, linear


# --------------------------------------------------------------------------------------------------------------------
# natural gradient step
# --------------------------------------------------------------------------------------------------------------------

def test_natural_gradient_step_hand_value():
    # F = diag(2, 8), g = (2, 4): s = F^{-1} g = (1, 0.5); s^T F s = 2 + 2 = 4
    # max_kl = 0.5: scale = sqrt(2 * 0.5 / 4) = 0.5 -> x = (0.5, 0.25); 1/2 x^T F x = 1/2 (0.5 + 0.5) = 0.5
    # expected improvement g . x = 1 + 1 = 2
    f = t([[2.0, 0.0], [0.0, 8.0]])
    step, expected = natural_gradient_step(t([2.0, 4.0]), lambda v: f @ v, max_kl=0.5)
    assert_close(step, t([0.5, 0.25]))
    assert_close(expected, t(2.0))
    with pytest.raises(ValueError):
        natural_gradient_step(t([2.0, 4.0]), lambda v: f @ v, max_kl=0.0)


@HYP
@given(n=st.integers(2, 20), seed=st.integers(0, 2 ** 31 - 1), max_kl=st.floats(1e-4, 1.0))
def test_natural_gradient_step_hits_the_quadratic_kl(n, seed, max_kl):
    gen = torch.Generator().manual_seed(seed)
    f = random_spd(n, gen, 0.5, 5.0)
    g = torch.randn(n, dtype=D, generator=gen)
    step, expected = natural_gradient_step(g, lambda v: f @ v, max_kl, cg_iterations=3 * n)
    assert_close(0.5 * step @ f @ step, t(max_kl))
    # the direction is F^{-1} g up to conjugate gradient's default stopping rule, |residual|^2 <= 1e-10: its
    # solution is then off by at most |residual| / lambda_min(F) = 1e-5 / 0.5 = 2e-5, times the step's scale
    # (an absolute 1e-6 failed at n=8, max_kl=1: off by 3e-6, within that bound)
    natural = torch.linalg.solve(f, g)
    scale = math.sqrt(2 * max_kl / (natural @ f @ natural).item())
    assert_close(step, scale * natural, rtol=1e-4, atol=2 * 2e-5 * scale)
    assert_close(expected, g @ step)
    assert expected > 0


# --------------------------------------------------------------------------------------------------------------------
# backtracking line search
# --------------------------------------------------------------------------------------------------------------------

def test_line_search_hand_example():
    # improvement(f) = f - f^2 (negative-free for f in (0, 1)) ... KL(f) = 2 f^2, max_kl 0.1:
    # f = 1: KL 2 > 0.1; f = 0.5: 0.5; f = 0.25: 0.125; f = 0.125: 0.03125 <= 0.1 and improvement > 0 -> accept, try 4
    res = backtracking_line_search(lambda f: (f - f * f, 2 * f * f), expected_improvement=1.0, max_kl=0.1)
    assert res.accepted
    assert res.fraction == 0.125
    assert res.tries == 4
    assert res.kl == pytest.approx(0.03125)
    assert res.improvement == pytest.approx(0.125 - 0.125 ** 2)
    # Armijo condition: with accept_ratio 0.95 need f - f^2 >= 0.95 f, i.e. f <= 0.05: f = 2^-5 = 0.03125
    res = backtracking_line_search(lambda f: (f - f * f, 2 * f * f), 1.0, 0.1, accept_ratio=0.95)
    assert res.fraction == 0.03125 and res.tries == 6


def test_line_search_rejects_when_nothing_qualifies():
    calls = []

    def evaluate(f):
        calls.append(f)
        return -1.0, 0.0  # never improves

    res = backtracking_line_search(evaluate, 1.0, 0.1, max_backtracks=5)
    assert not res.accepted and res.fraction == 0.0 and res.tries == 5
    assert calls == [1.0, 0.5, 0.25, 0.125, 0.0625]
    # improvement exactly zero is not enough; NaN never passes
    assert not backtracking_line_search(lambda f: (0.0, 0.0), 1.0, 0.1).accepted
    assert not backtracking_line_search(lambda f: (float("nan"), 0.0), 1.0, 0.1).accepted
    assert not backtracking_line_search(lambda f: (1.0, float("nan")), 1.0, 0.1).accepted
    # KL always above the region
    assert not backtracking_line_search(lambda f: (1.0, 0.2), 1.0, 0.1).accepted


@HYP
@given(
    improvements=st.lists(st.floats(-1.0, 1.0), min_size=10, max_size=10),
    kls=st.lists(st.floats(0.0, 0.2), min_size=10, max_size=10),
    max_kl=st.floats(0.01, 0.15),
    shrink=st.sampled_from([0.5, 0.8]),
)
def test_line_search_never_accepts_a_bad_fraction(improvements, kls, max_kl, shrink):
    tried = []

    def evaluate(fraction):
        i = len(tried)
        tried.append(fraction)
        return improvements[i], kls[i]

    res = backtracking_line_search(evaluate, 1.0, max_kl, max_backtracks=10, shrink=shrink)
    good = [i for i in range(10) if kls[i] <= max_kl and improvements[i] > 0]
    if good:
        first = good[0]
        assert res.accepted
        assert res.tries == first + 1
        assert res.fraction == pytest.approx(shrink ** first)
        assert res.kl == kls[first] and res.improvement == improvements[first]
        assert res.kl <= max_kl and res.improvement > 0
        assert tried == pytest.approx([shrink ** i for i in range(first + 1)])
    else:
        assert not res.accepted and res.fraction == 0.0


@pytest.mark.parametrize("max_kl", [1e-3, 1e-2, 5e-2, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_real_trpo_step_respects_trust_region(max_kl, seed):
    gen, states, theta_old = make_policy(seed + 10)
    with torch.no_grad():
        probs_old = policy_logits(theta_old, states).softmax(-1)
    actions = torch.multinomial(probs_old, 1, generator=gen).squeeze(-1)
    advantages = torch.randn(N_STATES, dtype=D, generator=gen)
    rows = torch.arange(N_STATES)
    old_log_probs = policy_logits(theta_old, states).log_softmax(-1)[rows, actions].detach()

    def surrogate(theta):  # L(theta) = mean_t r_t A_t
        log_probs = policy_logits(theta, states).log_softmax(-1)[rows, actions]
        return (torch.exp(log_probs - old_log_probs) * advantages).mean()

    th = theta_old.clone().requires_grad_()
    g = flat_grad(surrogate(th), [th])
    fvp = fisher_vector_product(mean_kl_from(theta_old, th, states), [th], damping=1e-3)
    step, expected = natural_gradient_step(g, fvp, max_kl)
    assert expected > 0
    base = surrogate(theta_old).item()

    def evaluate(fraction):
        with torch.no_grad():
            new = theta_old + fraction * step
            return surrogate(new).item() - base, mean_kl_from(theta_old, new, states).item()

    res = backtracking_line_search(evaluate, expected.item(), max_kl, max_backtracks=15)
    assert res.accepted
    with torch.no_grad():
        accepted_theta = theta_old + res.fraction * step
        actual_kl = mean_kl_from(theta_old, accepted_theta, states).item()
        actual_gain = surrogate(accepted_theta).item() - base
    assert actual_kl <= max_kl
    assert actual_gain > 0
    assert res.kl == pytest.approx(actual_kl) and res.improvement == pytest.approx(actual_gain)
    # the accepted step is the largest tried fraction inside the region: twice it (the previous try) was not
    if res.fraction < 1.0:
        previous_improvement, previous_kl = evaluate(2 * res.fraction)
        assert previous_kl > max_kl or previous_improvement <= 0
    # for a small trust region the quadratic model is accurate: the full step's actual KL is ~ max_kl
    if max_kl <= 1e-3:
        _, full_kl = evaluate(1.0)
        assert full_kl == pytest.approx(max_kl, rel=0.1)
