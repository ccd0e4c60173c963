"""Tests for advantage.objectives.policy_gradient: the six psi forms, the REINFORCE surrogate and its
gradient, advantage normalisation, the critic losses and explained variance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.policy_gradient import (
    PSI_FORMS,
    clipped_value_loss,
    explained_variance,
    normalize_advantages,
    policy_gradient_loss,
    psi,
    value_loss,
)

F64 = torch.float64
SETTINGS = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def tb(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


def right_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), T, dtype=F64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1.0
    return mask


@st.composite
def batches(draw, min_len: int = 0):
    """(N, T) random float64 data with a right-padding mask; returns (seed, N, T, mask)."""
    N = draw(st.integers(1, 5))
    T = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(min_len, T), min_size=N, max_size=N))
    return draw(seeds), N, T, right_padded_mask(lengths, T)


# ---------------------------------------------------------------------------------------------------------
# psi: the six forms on one hand example
# ---------------------------------------------------------------------------------------------------------

R = t64([1.0, 2.0, 3.0])
V = t64([1.0, 2.5, 4.0])
NV = t64([2.5, 4.0, 2.0])
Q = t64([5.0, 6.0, 7.0])
B = t64([0.5, 0.5, 0.5])
GAMMA = 0.5


class TestPsiHand:
    def test_total_return(self):
        # psi_1 = sum_t gamma^t r_t = 1 + 0.5*2 + 0.25*3 = 2.75 at every step
        assert_close(psi("total_return", R, GAMMA), t64([2.75, 2.75, 2.75]))
        # terminated at t=0: episodes [0] and [1, 2]: returns 1 and 2 + 0.5*3 = 3.5
        out = psi("total_return", R, GAMMA, terminated=tb([True, False, False]))
        assert_close(out, t64([1.0, 3.5, 3.5]))

    def test_reward_to_go(self):
        # psi_2: G2 = 3 ; G1 = 2 + 1.5 = 3.5 ; G0 = 1 + 1.75 = 2.75
        assert_close(psi("reward_to_go", R, GAMMA), t64([2.75, 3.5, 3.0]))
        # with next_values the cut after t=2 bootstraps V = 2: G2 = 3 + 1 = 4 ; G1 = 2 + 2 = 4 ; G0 = 1 + 2 = 3
        assert_close(psi("reward_to_go", R, GAMMA, next_values=NV), t64([3.0, 4.0, 4.0]))

    def test_reward_to_go_baseline(self):
        # psi_3 = G - b = [2.75 - 0.5, 3.5 - 0.5, 3 - 0.5]
        assert_close(psi("reward_to_go_baseline", R, GAMMA, baseline=B), t64([2.25, 3.0, 2.5]))
        with pytest.raises(ValueError):
            psi("reward_to_go_baseline", R, GAMMA)

    def test_q_value(self):
        # psi_4 = Q(s_t, a_t) as given
        assert_close(psi("q_value", R, GAMMA, q_values=Q), t64([5.0, 6.0, 7.0]))
        with pytest.raises(ValueError):
            psi("q_value", R, GAMMA)

    def test_advantage(self):
        # psi_5 = Q - V = [5 - 1, 6 - 2.5, 7 - 4]
        assert_close(psi("advantage", R, GAMMA, q_values=Q, values=V), t64([4.0, 3.5, 3.0]))
        with pytest.raises(ValueError):
            psi("advantage", R, GAMMA, q_values=Q)

    def test_td_residual(self):
        # psi_6 = r + 0.5 V(s') - V(s): 1 + 1.25 - 1 = 1.25 ; 2 + 2 - 2.5 = 1.5 ; 3 + 1 - 4 = 0
        assert_close(psi("td_residual", R, GAMMA, values=V, next_values=NV), t64([1.25, 1.5, 0.0]))
        # terminated at t=2: 3 - 4 = -1
        out = psi("td_residual", R, GAMMA, values=V, next_values=NV, terminated=tb([False, False, True]))
        assert_close(out, t64([1.25, 1.5, -1.0]))
        with pytest.raises(ValueError):
            psi("td_residual", R, GAMMA, values=V)

    def test_unknown_form(self):
        with pytest.raises(ValueError):
            psi("bogus", R, GAMMA)  # type: ignore[arg-type]

    def test_mask_zeroes_padding(self):
        mask = t64([1, 1, 0])
        # reward_to_go with the last step padded: G1 = 2 (last real step, nothing bootstrapped), G0 = 1 + 1 = 2
        assert_close(psi("reward_to_go", R, GAMMA, mask=mask), t64([2.0, 2.0, 0.0]))
        assert_close(psi("q_value", R, GAMMA, q_values=Q, mask=mask), t64([5.0, 6.0, 0.0]))
        assert_close(psi("td_residual", R, GAMMA, values=V, next_values=NV, mask=mask), t64([1.25, 1.5, 0.0]))

    @pytest.mark.parametrize("form", PSI_FORMS)
    def test_output_is_detached(self, form):
        inputs = {name: x.clone().requires_grad_(True) for name, x in
                  dict(values=V, next_values=NV, q_values=Q, baseline=B).items()}
        rewards = R.clone().requires_grad_(True)
        out = psi(form, rewards, GAMMA, **inputs)
        assert not out.requires_grad
        assert out.grad_fn is None


# ---------------------------------------------------------------------------------------------------------
# policy_gradient_loss: gradient of the surrogate = -(sum psi grad log pi) / normaliser
# ---------------------------------------------------------------------------------------------------------

def tiny_policy(seed: int, N: int, T: int, A: int = 3):
    """A tabular softmax policy, one logit vector per (n, t), and sampled actions."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N, T, A, generator=g, dtype=F64, requires_grad=True)
    actions = torch.randint(0, A, (N, T), generator=g)
    psi_values = torch.randn(N, T, generator=g, dtype=F64)

    def log_probs():
        return torch.log_softmax(theta, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    return theta, log_probs, psi_values


def estimator(theta, log_probs, psi_values, mask, normaliser):
    """-(sum_{n,t} m psi_{n,t} grad_theta log pi(a_{n,t}|s_{n,t})) / normaliser, one grad at a time.

    `normaliser` is an (N, T) tensor (the per-element denominator). Plain loop over elements, no surrogate.
    """
    N, T = psi_values.shape
    total = torch.zeros_like(theta)
    for n in range(N):
        for t in range(T):
            if mask[n, t] == 0:
                continue
            (grad_log_pi,) = torch.autograd.grad(log_probs()[n, t], theta)
            total += psi_values[n, t] * grad_log_pi / normaliser[n, t]
    return -total


@SETTINGS
@given(batches(), st.sampled_from(["token", "sequence", "constant"]), st.sampled_from([1.0, 2.5, 7.0]))
def test_policy_gradient_loss_gradient_is_the_estimator(batch, mode, length):
    seed, N, T, mask = batch
    theta, log_probs, psi_values = tiny_policy(seed, N, T)
    loss = policy_gradient_loss(log_probs(), psi_values, mask, mode, constant_length=length)
    (grad,) = torch.autograd.grad(loss, theta)
    if mode == "token":
        normaliser = torch.full((N, T), max(float(mask.sum()), 1.0), dtype=F64)
    elif mode == "sequence":
        normaliser = N * mask.sum(1, keepdim=True).clamp(min=1.0).expand(N, T)
    else:
        normaliser = torch.full((N, T), N * length, dtype=F64)
    assert_close(grad, estimator(theta, log_probs, psi_values, mask, normaliser))


@SETTINGS
@given(batches(), st.sampled_from(["token", "sequence", "constant"]))
def test_policy_gradient_loss_matches_hand_written_expression(batch, mode):
    # Autograd of the loss vs autograd of an explicitly written surrogate, w.r.t. log_probs.
    seed, N, T, mask = batch
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(N, T, generator=g, dtype=F64).requires_grad_(True)
    w = torch.randn(N, T, generator=g, dtype=F64)
    loss = policy_gradient_loss(lp, w, mask, mode, constant_length=4.0)
    if mode == "token":
        expected = -(w * lp * mask).sum() / mask.sum().clamp(min=1.0)
    elif mode == "sequence":
        expected = -sum((w[n] * lp[n] * mask[n]).sum() / mask[n].sum().clamp(min=1.0) for n in range(N)) / N
    else:
        expected = -(w * lp * mask).sum() / (N * 4.0)
    assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, lp)
    (grad_expected,) = torch.autograd.grad(expected, lp)
    assert_close(grad, grad_expected)


def test_constant_one_is_reinforce_average_over_trajectories():
    # (N=2, T=3): loss = -(1/N) sum_n sum_t psi log pi
    lp = t64([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]]).requires_grad_(True)
    w = t64([[1.0, 2.0, 3.0], [4.0, -2.0, 100.0]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    # row 0: -1 - 4 - 9 = -14 ; row 1: -2 + 1 = -1 ; -(1/2)(-15) = 7.5
    loss = policy_gradient_loss(lp, w, mask, "constant", constant_length=1.0)
    assert_close(loss, t64(7.5))
    loss.backward()
    # d loss / d lp = -psi m / N
    assert_close(lp.grad, t64([[-0.5, -1.0, -1.5], [-2.0, 1.0, 0.0]]))
    # token mode: 15 / 5 = 3 ; sequence mode: -(1/2)(-14/3 - 1/2) = 31/12
    assert_close(policy_gradient_loss(lp, w, mask, "token"), t64(3.0))
    assert_close(policy_gradient_loss(lp, w, mask, "sequence"), t64(31.0 / 12.0))


def test_policy_gradient_loss_does_not_differentiate_psi():
    lp = t64([[-1.0, -2.0]]).requires_grad_(True)
    w = t64([[1.0, 2.0]]).requires_grad_(True)
    policy_gradient_loss(lp, w).backward()
    assert w.grad is None
    assert_close(lp.grad, t64([[-0.5, -1.0]]))


# ---------------------------------------------------------------------------------------------------------
# normalize_advantages
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(batches(min_len=1))
def test_normalize_advantages_mean_zero_std_one(batch):
    seed, N, T, mask = batch
    g = torch.Generator().manual_seed(seed)
    adv = 3.0 + 5.0 * torch.randn(N, T, generator=g, dtype=F64)
    adv[mask == 0] = 1e6  # garbage padding
    real = mask == 1
    assume(int(real.sum()) >= 2)  # a single real element has no spread to normalise
    out = normalize_advantages(adv, mask, eps=0.0)
    assert torch.all(out[~real] == 0)
    assert_close(out[real].mean(), t64(0.0), atol=1e-10, rtol=0)
    assert_close(out[real].std(unbiased=False), t64(1.0))
    # exactly (A - mean) / std over the real elements
    a = adv[real]
    assert_close(out[real], (a - a.mean()) / a.std(unbiased=False))


def test_normalize_advantages_hand_and_detached():
    adv = t64([1.0, 2.0, 3.0, 1e6]).requires_grad_(True)
    out = normalize_advantages(adv, t64([1, 1, 1, 0]), eps=0.0)
    # mean 2, population var (1 + 0 + 1)/3 = 2/3
    s = (2.0 / 3.0) ** 0.5
    assert_close(out, t64([-1.0 / s, 0.0, 1.0 / s, 0.0]))
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------------------
# value_loss and clipped_value_loss
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(batches())
def test_value_loss_gradient_is_minus_error_over_count(batch):
    seed, N, T, mask = batch
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, T, generator=g, dtype=F64).requires_grad_(True)
    targets = torch.randn(N, T, generator=g, dtype=F64).requires_grad_(True)
    loss = value_loss(values, targets, mask)
    count = mask.sum().clamp(min=1.0)
    assert_close(loss, 0.5 * ((targets - values) ** 2 * mask).sum() / count)
    loss.backward()
    assert_close(values.grad, -(targets - values).detach() * mask / count)
    assert targets.grad is None


def test_value_loss_semi_gradient_td_critic():
    # Seed 004's critic: V_w over states s_0..s_3 of one trajectory, target r_t + gamma V(s_{t+1}) for t = 0..2.
    # The gradient w.r.t. w must be -(r + gamma V(s') - V(s)) grad V(s) / 3: no term through V(s').
    w = t64([1.0, 2.0, 4.0, 3.0]).requires_grad_(True)
    r = t64([1.0, 0.0, 2.0])
    gamma = 0.5
    targets = r + gamma * w[1:]
    value_loss(w[:-1], targets).backward()
    # deltas: 1 + 1 - 1 = 1 ; 0 + 2 - 2 = 0 ; 2 + 1.5 - 4 = -0.5 ; grad = -delta / 3, 0 for V(s_3)
    assert_close(w.grad, t64([-1.0 / 3.0, 0.0, 0.5 / 3.0, 0.0]))


@SETTINGS
@given(batches(), st.floats(0.0, 2.0))
def test_clipped_value_loss_equals_value_loss_inside_clip(batch, clip):
    seed, N, T, mask = batch
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(N, T, generator=g, dtype=F64)
    values = (old + clip * (2.0 * torch.rand(N, T, generator=g, dtype=F64) - 1.0)).requires_grad_(True)
    targets = torch.randn(N, T, generator=g, dtype=F64)
    clipped = clipped_value_loss(values, old, targets, clip, mask)
    plain = value_loss(values, targets, mask)
    assert_close(clipped, plain)
    (g1,) = torch.autograd.grad(clipped, values)
    (g2,) = torch.autograd.grad(plain, values)
    assert_close(g1, g2)


@SETTINGS
@given(batches(), st.floats(0.05, 1.0))
def test_clipped_value_loss_gradient_zero_where_clipped_branch_wins(batch, clip):
    seed, N, T, mask = batch
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(N, T, generator=g, dtype=F64)
    values = (old + 3.0 * torch.randn(N, T, generator=g, dtype=F64)).requires_grad_(True)
    targets = torch.randn(N, T, generator=g, dtype=F64)
    old_req = old.clone().requires_grad_(True)
    targets_req = targets.clone().requires_grad_(True)
    loss = clipped_value_loss(values, old_req, targets_req, clip, mask)
    loss.backward()
    v = values.detach()
    clipped_v = old + (v - old).clamp(-clip, clip)
    unclipped_err, clipped_err = (v - targets) ** 2, (clipped_v - targets) ** 2
    count = mask.sum().clamp(min=1.0)
    # hand-written value and gradient
    assert_close(loss, 0.5 * (torch.maximum(unclipped_err, clipped_err) * mask).sum() / count)
    clipped_wins = clipped_err > unclipped_err
    expected_grad = torch.where(clipped_wins, torch.zeros_like(v), (v - targets) * mask / count)
    assert_close(values.grad, expected_grad)
    assert torch.all(values.grad[clipped_wins] == 0)
    assert old_req.grad is None and targets_req.grad is None


def test_clipped_value_loss_hand():
    old = t64([0.0, 0.0, 0.0])
    values = t64([1.0, 1.0, 0.1]).requires_grad_(True)
    targets = t64([2.0, -1.0, 0.0])
    # clip 0.5: clipped V = [0.5, 0.5, 0.1]
    # elem 0: (1-2)^2 = 1 vs (0.5-2)^2 = 2.25 -> 2.25 (clipped wins, zero grad)
    # elem 1: (1+1)^2 = 4 vs (0.5+1)^2 = 2.25 -> 4 (unclipped, grad (1+1)/3)
    # elem 2: inside clip: 0.01 -> grad 0.1/3
    loss = clipped_value_loss(values, old, targets, 0.5)
    assert_close(loss, t64(0.5 * (2.25 + 4.0 + 0.01) / 3.0))
    loss.backward()
    assert_close(values.grad, t64([0.0, 2.0 / 3.0, 0.1 / 3.0]))
    with pytest.raises(ValueError):
        clipped_value_loss(values, old, targets, -0.1)


# ---------------------------------------------------------------------------------------------------------
# explained_variance
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(batches(min_len=1))
def test_explained_variance_perfect_and_constant(batch):
    seed, N, T, mask = batch
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(N, T, generator=g, dtype=F64)
    garbage = torch.where(mask == 1, targets, torch.full_like(targets, 1e6))
    real = mask == 1
    assume(float(targets[real].var(unbiased=False)) > 1e-6)
    assert_close(explained_variance(targets.clone(), garbage, mask), t64(1.0))
    mean = targets[real].mean()
    assert_close(explained_variance(torch.full_like(targets, float(mean)), garbage, mask), t64(0.0),
                 atol=1e-10, rtol=0)
    # any constant prediction explains nothing either: Var[t - c] = Var[t]
    assert_close(explained_variance(torch.full_like(targets, 7.0), garbage, mask), t64(0.0), atol=1e-10, rtol=0)


def test_explained_variance_hand():
    targets = t64([1.0, 2.0, 3.0, 4.0])
    preds = t64([1.0, 2.0, 3.0, 5.0])
    # residual [0, 0, 0, -1]: mean -0.25, var (3*0.0625 + 0.5625)/4 = 0.1875 ; Var[targets] = 1.25
    # EV = 1 - 0.1875/1.25 = 0.85
    assert_close(explained_variance(preds, targets), t64(0.85))
