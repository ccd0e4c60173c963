"""Q-learning targets (docs/math.md §3: the notes name Q-learning and define Q(s_t, a) = r_t + gamma V(s_{t+1})).

One of the notes: "the Q value estimates how well an actor will do after a state (and action)". With the greedy policy,
V(s') = max_a' Q(s', a'), which gives the Bellman optimality target of Q-learning / DQN:

    y = r + gamma * (1 - terminated) * max_a' Q_target(s', a')

Double DQN (van Hasselt et al. 2016) picks a' with the online network and evaluates it with the target network,
y = r + gamma (1 - terminated) Q_target(s', argmax_a' Q_online(s', a')), which removes max's upward bias.
Truncation is not termination: a transition cut by a time limit still bootstraps from s' (the final observation).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def q_learning_targets(rewards: Tensor, next_q_target: Tensor, terminated: Tensor, gamma: float,
                       next_q_online: Tensor | None = None) -> Tensor:
    """Bellman targets y = r + gamma (1 - terminated) Q_target(s', a*), a* = argmax of online (double) or target.

    Args:
        rewards: (B,); next_q_target: (B, A) target-network values at s'; terminated: (B,) bool.
        next_q_online: (B, A) online-network values at s' for double DQN, or None for the plain max.
    Returns:
        (B,) targets, detached.
    """
    with torch.no_grad():
        if next_q_online is None:
            next_value = next_q_target.max(dim=-1).values
        else:
            best = next_q_online.argmax(dim=-1, keepdim=True)
            next_value = next_q_target.gather(-1, best).squeeze(-1)
        next_value = torch.where(terminated.to(torch.bool), torch.zeros_like(next_value), next_value)
        return rewards + gamma * next_value


def td_loss(q_taken: Tensor, targets: Tensor, kind: Literal["huber", "mse"] = "huber") -> Tensor:
    """Regression of Q(s, a) on the targets: Huber (DQN's gradient clipping, Mnih et al. 2015) or 1/2 squared error."""
    if kind == "huber":
        return F.smooth_l1_loss(q_taken, targets.detach())
    if kind == "mse":
        return 0.5 * ((q_taken - targets.detach()) ** 2).mean()
    raise ValueError(f"unknown TD loss {kind!r}; expected 'huber' or 'mse'")


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Linear interpolation from `start` to `end` over `duration` steps, then constant (epsilon-greedy's epsilon)."""
    if step >= duration:
        return end
    return start + (end - start) * step / duration
