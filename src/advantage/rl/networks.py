"""Policies and critics for flat observations: MLPs with orthogonal initialisation.

A policy maps observations to the parameters of an action distribution: logits of a categorical (Discrete
actions) or the mean of a diagonal Gaussian with a state-independent log standard deviation (Box actions).
Log-probabilities, entropies and KLs go through advantage.objectives, so the classic algorithms use the same
formulas as the language-model ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from advantage.objectives.kl import categorical_entropy, categorical_kl, gaussian_entropy, gaussian_kl
from advantage.rl.envs import SpaceInfo

LOG_2PI = math.log(2.0 * math.pi)


ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def layer(in_features: int, out_features: int, gain: float = math.sqrt(2.0), orthogonal: bool = True) -> nn.Linear:
    """Linear layer with orthogonal weights and zero bias (the PPO implementation details of Engstrom et al.);
    `orthogonal=False` keeps PyTorch's default (Kaiming-uniform) initialisation, as SB3's `ortho_init=False`."""
    linear = nn.Linear(in_features, out_features)
    if orthogonal:
        nn.init.orthogonal_(linear.weight, gain)
        nn.init.zeros_(linear.bias)
    return linear


def mlp(in_features: int, hidden: tuple[int, ...], out_features: int, output_gain: float,
        activation: str = "tanh", orthogonal: bool = True) -> nn.Sequential:
    """in -> hidden... -> out with `activation` ("tanh" or "relu") between layers; with orthogonal
    initialisation the last layer is initialised with `output_gain`."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [layer(width, size, orthogonal=orthogonal), ACTIVATIONS[activation]()]
        width = size
    layers.append(layer(width, out_features, output_gain, orthogonal))
    return nn.Sequential(*layers)


class Policy(nn.Module):
    """pi_theta(a | s): categorical over Discrete actions or diagonal Gaussian over Box actions.

    `forward(obs)` returns the distribution parameters as one tensor: logits (B, A) for a categorical, or the
    mean (B, D) for a Gaussian (whose log std is the parameter `log_std`). Everything else is computed from them.
    """

    def __init__(self, space: SpaceInfo, hidden: tuple[int, ...] = (64, 64), initial_log_std: float = 0.0,
                 activation: str = "tanh", orthogonal_init: bool = True):
        super().__init__()
        self.discrete = space.discrete
        self.body = mlp(space.observation_dim, hidden, space.action_dim, 0.01, activation, orthogonal_init)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((space.action_dim,), float(initial_log_std)))

    def forward(self, observations: Tensor) -> Tensor:
        """Distribution parameters: logits (B, A) or Gaussian mean (B, D)."""
        return self.body(observations)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw a ~ pi(.|s) and return (actions, log pi(a|s)). Actions: (B,) int64 or (B, D) float."""
        if self.discrete:
            log_p = torch.log_softmax(params, dim=-1)
            actions = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)
            return actions, log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        noise = torch.randn(params.shape, generator=generator, dtype=params.dtype, device=params.device)
        actions = params + self.log_std.exp() * noise
        return actions, self.log_prob(params, actions)

    def mode(self, params: Tensor) -> Tensor:
        """The most likely action (deterministic evaluation)."""
        return params.argmax(-1) if self.discrete else params

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        """log pi(a|s), shape (B,)."""
        if self.discrete:
            return torch.log_softmax(params, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        z = (actions - params) * torch.exp(-self.log_std)
        return (-0.5 * z ** 2 - self.log_std - 0.5 * LOG_2PI).sum(-1)

    def entropy(self, params: Tensor) -> Tensor:
        """H(pi(.|s)), shape (B,)."""
        if self.discrete:
            return categorical_entropy(params)
        return gaussian_entropy(self.log_std).expand(params.shape[0])

    def kl(self, old_params: Tensor, params: Tensor, old_log_std: Tensor | None = None) -> Tensor:
        """Exact KL(pi_old(.|s) || pi_theta(.|s)) per state, shape (B,) (docs/math.md §4; PPO's penalty direction)."""
        if self.discrete:
            return categorical_kl(old_params, params)
        old_log_std = self.log_std.detach() if old_log_std is None else old_log_std
        return gaussian_kl(old_params, old_log_std.expand_as(old_params), params, self.log_std.expand_as(params))


class ValueFunction(nn.Module):
    """V_w(s): an MLP with a scalar output, shape (B,)."""

    def __init__(self, observation_dim: int, hidden: tuple[int, ...] = (64, 64), activation: str = "tanh",
                 orthogonal_init: bool = True):
        super().__init__()
        self.body = mlp(observation_dim, hidden, 1, 1.0, activation, orthogonal_init)

    def forward(self, observations: Tensor) -> Tensor:
        """V(s) for a batch of observations (B, obs_dim) -> (B,)."""
        return self.body(observations).squeeze(-1)


class QNetwork(nn.Module):
    """Q_w(s, .): an MLP with one output per discrete action, shape (B, A) (DQN)."""

    def __init__(self, observation_dim: int, num_actions: int, hidden: tuple[int, ...] = (120, 84),
                 activation: str = "relu", orthogonal_init: bool = True):
        super().__init__()
        self.body = mlp(observation_dim, hidden, num_actions, 1.0, activation, orthogonal_init)

    def forward(self, observations: Tensor) -> Tensor:
        """Q(s, a) for every a: (B, obs_dim) -> (B, A)."""
        return self.body(observations)
