"""Q-learning targets: hand values, double-DQN selection, termination vs truncation, losses and schedule."""

import pytest
import torch

from advantage.objectives.q_learning import linear_schedule, q_learning_targets, td_loss


def test_targets_hand_values():
    rewards = torch.tensor([1.0, 0.5])
    next_q_target = torch.tensor([[2.0, 3.0], [4.0, -1.0]])
    terminated = torch.tensor([False, True])
    # y0 = 1 + 0.9 * max(2, 3) = 3.7; y1 = 0.5 (terminal: nothing bootstrapped)
    torch.testing.assert_close(q_learning_targets(rewards, next_q_target, terminated, 0.9), torch.tensor([3.7, 0.5]))


def test_double_dqn_evaluates_the_online_argmax_with_the_target_network():
    rewards = torch.zeros(1)
    next_q_target = torch.tensor([[2.0, 3.0]])
    next_q_online = torch.tensor([[5.0, 1.0]])  # online prefers action 0, whose target value is 2 (not max 3)
    y = q_learning_targets(rewards, next_q_target, torch.tensor([False]), 1.0, next_q_online)
    torch.testing.assert_close(y, torch.tensor([2.0]))


def test_double_dqn_target_is_never_above_the_plain_max():
    g = torch.Generator().manual_seed(0)
    target, online = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g)
    plain = q_learning_targets(torch.zeros(100), target, torch.zeros(100, dtype=torch.bool), 0.99)
    double = q_learning_targets(torch.zeros(100), target, torch.zeros(100, dtype=torch.bool), 0.99, online)
    assert bool((double <= plain + 1e-7).all()) and bool((double < plain).any())


def test_targets_carry_no_gradient():
    next_q = torch.randn(3, 2, requires_grad=True)
    assert not q_learning_targets(torch.zeros(3), next_q, torch.zeros(3, dtype=torch.bool), 0.9).requires_grad


def test_td_losses():
    q = torch.tensor([1.0, 4.0], requires_grad=True)
    y = torch.tensor([1.5, 1.0])
    # Huber: 0.5 * 0.5^2 = 0.125 for |e| = 0.5 < 1; |e| - 0.5 = 2.5 for |e| = 3; mean 1.3125
    torch.testing.assert_close(td_loss(q, y, "huber"), torch.tensor(1.3125))
    # 1/2 squared error: 0.5 * (0.25 + 9) / 2 = 2.3125
    torch.testing.assert_close(td_loss(q, y, "mse"), torch.tensor(2.3125))
    with pytest.raises(ValueError):
        td_loss(q, y, "l3")


def test_linear_schedule():
    assert linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert abs(linear_schedule(1.0, 0.1, 100, 50) - 0.55) < 1e-12
    assert linear_schedule(1.0, 0.1, 100, 1000) == 0.1
    assert linear_schedule(1.0, 0.1, 0, 5) == 0.1
