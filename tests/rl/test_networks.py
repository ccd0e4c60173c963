"""Networks of the classic algorithms: the fused inference path, flat parameters, activations and presets."""

import numpy as np
import pytest
import torch
from torch import nn

from advantage.rl.api import ALGORITHMS, algorithm_module
from advantage.rl.envs import SpaceInfo
from advantage.rl.flat_parameters import FlatParameters
from advantage.rl.fused_forward import fused_forward
from advantage.rl.networks import Policy, QNetwork, ValueFunction
from advantage.rl.presets import preset_for
from advantage.run.config import apply_overrides

DISCRETE = SpaceInfo(6, True, 3)
BOX = SpaceInfo(11, False, 3, np.full(3, -1, np.float32), np.full(3, 1, np.float32))


@pytest.mark.parametrize("space", [DISCRETE, BOX], ids=["discrete", "box"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_fused_forward_matches_the_modules(space, activation):
    torch.manual_seed(0)
    policy = Policy(space, (32, 16), activation=activation)
    critic = ValueFunction(space.observation_dim, (32, 16), activation=activation)
    observations = torch.randn(7, space.observation_dim)
    fused = fused_forward(policy, critic)(observations)
    torch.testing.assert_close(fused[:, :space.action_dim], policy(observations), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[:, -1], critic(observations), rtol=1e-5, atol=1e-6)
    alone = fused_forward(policy, None)(observations)
    torch.testing.assert_close(alone[:, :space.action_dim], policy(observations), rtol=1e-5, atol=1e-6)
    assert torch.all(alone[:, -1] == 0)


def _loss(policy, critic, observations):
    return policy(observations).pow(2).sum() + policy.log_std.exp().sum() + critic(observations).sin().sum()


def test_flat_parameters_give_the_same_gradients_clipping_and_adam_steps():
    torch.manual_seed(0)
    reference = [Policy(BOX, (16, 16), initial_log_std=-0.5), ValueFunction(11, (16, 16))]
    flat_modules = [Policy(BOX, (16, 16), initial_log_std=-0.5), ValueFunction(11, (16, 16))]
    for target, source in zip(flat_modules, reference):
        target.load_state_dict(source.state_dict())
    flat = FlatParameters(flat_modules)
    reference_parameters = [p for m in reference for p in m.parameters()]
    reference_adam = torch.optim.Adam(reference_parameters, lr=1e-2, eps=1e-5)
    flat_adam = torch.optim.Adam([flat.flat], lr=1e-2, eps=1e-5, fused=True)
    for step in range(5):
        observations = torch.randn(9, 11) * (step + 1)
        reference_adam.zero_grad(set_to_none=True)
        _loss(*reference, observations).backward()
        flat.zero_grad()
        _loss(*flat_modules, observations).backward()
        # backward wrote into the views: the flat gradient is every module's gradient, in order
        torch.testing.assert_close(flat.flat.grad, torch.cat([p.grad.reshape(-1) for p in reference_parameters]))
        expected_norm = nn.utils.clip_grad_norm_(reference_parameters, 0.5)
        norm = flat.clip_grad_norm(0.5)
        torch.testing.assert_close(norm, expected_norm)
        torch.testing.assert_close(flat.flat.grad, torch.cat([p.grad.reshape(-1) for p in reference_parameters]))
        reference_adam.step()
        flat_adam.step()
        for a, b in zip(reference_parameters, flat.parameters):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the modules still own ordinary parameters: state_dicts load in place and keep sharing the flat storage
    state = {k: v + 1 for k, v in flat_modules[1].state_dict().items()}
    flat_modules[1].load_state_dict(state)
    torch.testing.assert_close(flat.flat[-1], state["body.4.bias"][0])


def test_activation_and_initialisation_options():
    relu = Policy(DISCRETE, (8,), activation="relu")
    assert any(isinstance(m, nn.ReLU) for m in relu.body) and not any(isinstance(m, nn.Tanh) for m in relu.body)
    orthogonal = ValueFunction(6, (8,))
    assert torch.all(orthogonal.body[0].bias == 0)
    weight = orthogonal.body[0].weight  # (8, 6): orthonormal columns scaled by sqrt(2)
    torch.testing.assert_close(weight.t() @ weight, 2.0 * torch.eye(6), rtol=1e-4, atol=1e-4)
    default = ValueFunction(6, (8,), orthogonal_init=False)
    assert torch.any(default.body[0].bias != 0)  # PyTorch's default init draws the biases too
    assert QNetwork(6, 3, (8,), activation="tanh").body[1].__class__ is nn.Tanh


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1", "Hopper-v5", "HalfCheetah-v5"])
def test_every_shipped_preset_is_a_valid_config(algorithm, env_id):
    preset = preset_for(algorithm, env_id)
    module = algorithm_module(algorithm)
    config = apply_overrides(module.CONFIG(), preset, f"preset {algorithm}/{env_id}")
    module.validate(config)
    required = {"CartPole-v1": ALGORITHMS, "Acrobot-v1": ALGORITHMS, "Pendulum-v1": ("ppo", "trpo"),
                "Hopper-v5": ("ppo",), "HalfCheetah-v5": ("ppo",)}
    if algorithm in required[env_id]:
        assert preset, f"no {algorithm} preset for {env_id}"
