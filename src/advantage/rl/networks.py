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
        """Exact KL(pi_old(.|s) || pi_theta(.|s)) per state, shape (B,) (seed 000's D_KL; PPO's penalty direction)."""
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


class FlatParameters:
    """The parameters of several modules stored as views into one contiguous tensor, gradients likewise.

    Small networks are trained with many tiny steps, where the per-tensor work of the optimiser, of
    `clip_grad_norm_` and of `zero_grad` (one kernel per weight and bias, 13 tensors for an actor and a critic)
    costs more than the arithmetic. With every parameter a view into `flat` and every gradient a view into
    `flat.grad`, each of those is a single operation on one tensor. Backward still writes each module's gradient
    (into its view, in place), and the modules, their state_dicts and checkpoints are unchanged.
    The optimiser must be built on `[flat_parameters.flat]`, not on the modules' parameters.
    """

    def __init__(self, modules: list[nn.Module]):
        parameters = [p for module in modules for p in module.parameters()]
        total = sum(p.numel() for p in parameters)
        self.flat = nn.Parameter(torch.empty(total, dtype=parameters[0].dtype))
        self.flat.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in parameters:
            size = p.numel()
            self.flat.data[offset:offset + size].copy_(p.data.reshape(-1))
            p.data = self.flat.data[offset:offset + size].view_as(p)
            # A gradient that already exists is accumulated in place by autograd, so backward fills the view.
            p.grad = self.flat.grad[offset:offset + size].view_as(p)
            offset += size
        self.parameters = parameters

    def zero_grad(self) -> None:
        """Zero every gradient at once (never set them to None: the views must survive)."""
        self.flat.grad.zero_()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Scale all gradients together so their global L2 norm is at most `max_norm` (<= 0: no clipping).

        Same rule as torch.nn.utils.clip_grad_norm_: factor min(1, max_norm / (norm + 1e-6)). Returns the norm
        before clipping.
        """
        norm = torch.linalg.vector_norm(self.flat.grad)
        if max_norm > 0:
            self.flat.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm


def _linear_layers(module: nn.Sequential) -> list[nn.Linear]:
    return [m for m in module if isinstance(m, nn.Linear)]


def fused_forward(policy: Policy, critic: ValueFunction | None):
    """A fast inference function obs (B, obs_dim) -> (B, P + 1): the policy's outputs and V(s) in one pass.

    Collection calls the networks once per vector step with a handful of rows, where PyTorch's per-module
    overhead dominates (about 4x the arithmetic for two 64x64 MLPs). Concatenating the first layers and
    block-diagonalising the others runs both networks as 3 matrix products instead of 6 module calls. Built from
    the current weights (rebuild after every update); exact up to float summation order (tests compare it).
    Without a critic the last column is 0.
    """
    actor_layers = _linear_layers(policy.body)
    if critic is None:
        weights = [layer.weight.detach().t().contiguous() for layer in actor_layers]
        biases = [layer.bias.detach() for layer in actor_layers]
        weights[-1] = torch.cat([weights[-1], torch.zeros(weights[-1].shape[0], 1)], dim=1)
        biases[-1] = torch.cat([biases[-1], torch.zeros(1)])
    else:
        critic_layers = _linear_layers(critic.body)
        if len(critic_layers) != len(actor_layers):
            raise ValueError("fused_forward needs policy and critic of the same depth")
        weights = [torch.cat([actor_layers[0].weight, critic_layers[0].weight]).detach().t().contiguous()]
        biases = [torch.cat([actor_layers[0].bias, critic_layers[0].bias]).detach()]
        for a, c in zip(actor_layers[1:], critic_layers[1:]):
            weights.append(torch.block_diag(a.weight, c.weight).detach().t().contiguous())
            biases.append(torch.cat([a.bias, c.bias]).detach())
    activation = _activation(policy.body)
    last = len(weights) - 1

    def forward(observations: Tensor) -> Tensor:
        hidden = observations
        for index, (weight, bias) in enumerate(zip(weights, biases)):
            hidden = torch.addmm(bias, hidden, weight)
            if index < last:
                hidden = activation(hidden)
        return hidden

    return forward


def _activation(module: nn.Sequential):
    for m in module:
        if isinstance(m, nn.Tanh):
            return torch.tanh
        if isinstance(m, nn.ReLU):
            return torch.relu
    return lambda x: x
