"""KL-shaped per-token RLHF rewards and the PPO-ptx term (advantage.objectives.rlhf)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.kl import kl_k3
from advantage.objectives.rlhf import kl_penalty_loss, last_token_index, ptx_loss, shaped_token_rewards

D = torch.float64
HYP = settings(max_examples=50, deadline=None)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def test_last_token_index_hand_values():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert torch.equal(last_token_index(mask), torch.tensor([2, 1, 0, 0]))
    assert torch.equal(last_token_index(mask.bool()), torch.tensor([2, 1, 0, 0]))
    assert torch.equal(last_token_index(mask.to(D)), torch.tensor([2, 1, 0, 0]))


@HYP
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8))
def test_last_token_index_is_length_minus_one(lengths):
    mask = (torch.arange(9).expand(len(lengths), 9) < torch.tensor(lengths).unsqueeze(-1)).long()
    assert last_token_index(mask).tolist() == [max(n - 1, 0) for n in lengths]


def test_shaped_token_rewards_hand_values():
    # beta = 0.1, k1 = log pi - log pi_ref
    # row 0 (3 tokens): k1 = (-1 - -1.5, -2 - -1, -3 - -3) = (0.5, -1, 0) -> -beta k1 = (-0.05, 0.1, 0); score 2 at t=2
    # row 1 (2 tokens): k1 = (-0.5 - -1, -1 - -1) = (0.5, 0); pad -> 0    -> (-0.05, 0, 0); score -1 at t=1
    log_probs = t([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]])
    ref = t([[-1.5, -1.0, -3.0], [-1.0, -1.0, -9.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = shaped_token_rewards(t([2.0, -1.0]), log_probs, ref, mask, beta=0.1)
    assert_close(rewards, t([[-0.05, 0.1, 2.0], [-0.05, -1.0, 0.0]]))
    assert_close(kl, t([[0.5, -1.0, 0.0], [0.5, 0.0, 0.0]]))
    # undiscounted return of each row = score - beta * sum_t k1 = score - beta log(pi/pi_ref)(y|x)
    assert_close(rewards.sum(1), t([2.0 - 0.1 * (-0.5), -1.0 - 0.1 * 0.5]))


def test_shaped_token_rewards_random_and_detached():
    gen = torch.Generator().manual_seed(0)
    b, length = 5, 7
    lengths = torch.tensor([7, 1, 4, 0, 6])
    mask = (torch.arange(length).expand(b, length) < lengths.unsqueeze(-1)).to(D)
    log_probs = (-torch.rand(b, length, dtype=D, generator=gen) * 3).requires_grad_()
    ref = -torch.rand(b, length, dtype=D, generator=gen) * 3
    scores = torch.randn(b, dtype=D, generator=gen).requires_grad_()
    beta = 0.2
    rewards, kl = shaped_token_rewards(scores, log_probs, ref, mask, beta)
    assert not rewards.requires_grad and not kl.requires_grad
    k1 = (log_probs.detach() - ref) * mask
    expected = -beta * k1
    for row, n in enumerate(lengths.tolist()):
        if n > 0:
            expected[row, n - 1] += scores[row].detach()
    assert_close(rewards, expected)
    assert_close(kl, k1)
    assert torch.all(rewards[mask == 0] == 0)
    assert torch.all(rewards[3] == 0)  # an empty answer gets neither penalty nor score
    # another estimator: k3 per token
    rewards3, kl3 = shaped_token_rewards(scores, log_probs, ref, mask, beta, estimator="k3")
    k3 = kl_k3(log_probs.detach(), ref) * mask
    assert_close(kl3, k3)
    assert_close(rewards3 - expected, -beta * (k3 - k1))
    # beta = 0: pure score at the last token, KL reported as 0
    rewards0, kl0 = shaped_token_rewards(scores, log_probs, ref, mask, 0.0)
    assert_close(rewards0.sum(1), scores.detach() * (lengths > 0).to(D))
    assert torch.all(kl0 == 0)


def test_ptx_loss_hand_values():
    # log probs (-1, -2, -3) and (-4, -5, pad); coefficient 0.5
    # token:    -0.5 * (-15 / 5) = 1.5
    # constant L = 1: -0.5 * ((-6) + (-9)) / 2 = 3.75  (= -gamma E_x[log pi(x)], per-sequence sums)
    # sequence: -0.5 * ((-6/3) + (-9/2)) / 2 = 1.625
    lp = t([[-1.0, -2.0, -3.0], [-4.0, -5.0, 123.0]]).requires_grad_()
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss = ptx_loss(lp, mask, 0.5)
    assert_close(loss, t(1.5))
    assert_close(ptx_loss(lp, mask, 0.5, aggregation="constant", constant_length=1), t(3.75))
    assert_close(ptx_loss(lp, mask, 0.5, aggregation="sequence"), t(1.625))
    loss.backward()
    assert_close(lp.grad, -0.5 / 5 * mask)
    # no mask: every element real: -0.5 * (-15 + 123) / 6
    assert_close(ptx_loss(lp, None, 0.5), t(-0.5 * 108 / 6))


def test_ptx_loss_random_matches_definitions():
    gen = torch.Generator().manual_seed(1)
    b, length = 4, 6
    lengths = torch.tensor([6, 2, 5, 3])
    mask = (torch.arange(length).expand(b, length) < lengths.unsqueeze(-1)).to(D)
    lp = -torch.rand(b, length, dtype=D, generator=gen) * 4
    coef = 0.7
    token_mean = (lp * mask).sum() / mask.sum()
    assert_close(ptx_loss(lp, mask, coef), -coef * token_mean)
    sequence_log_likelihood = (lp * mask).sum(1)  # log pi(x) = sum_t log pi(x_t | x_<t)
    assert_close(ptx_loss(lp, mask, coef, aggregation="constant", constant_length=1),
                 -coef * sequence_log_likelihood.mean())
    with pytest.raises(ValueError):
        ptx_loss(lp, mask, coef, aggregation="constant")
    assert math.isclose(ptx_loss(lp, mask, 0.0).item(), 0.0, abs_tol=0.0)


def test_kl_penalty_loss_is_the_token_mean_of_beta_k_and_its_gradient_is_pathwise():
    """beta sum_{b,t} m k2(a_t) / num_tokens by hand; its gradient in log pi is beta (log pi - log pi_ref) / N per
    real token (k2 = 1/2 (log pi - log pi_ref)^2), 0 on padding."""
    log_probs = t([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]]).requires_grad_(True)
    ref = t([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = kl_penalty_loss(log_probs, ref, mask, 0.2, "k2")
    assert_close(loss, t(0.2 * (0.5 * 0.25 + 0.5 * 1.0 + 0.0) / 3))
    loss.backward()
    assert_close(log_probs.grad, t([[0.2 * 0.5 / 3, 0.2 * -1.0 / 3, 0.0], [0.0, 0.0, 0.0]]))
    # A minibatch share of a larger batch divides by the whole batch's tokens.
    assert_close(kl_penalty_loss(log_probs, ref, mask, 0.2, "k2", num_tokens=6), loss.detach() / 2)
