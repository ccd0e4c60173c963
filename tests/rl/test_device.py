"""`--device` for the classic algorithms (issue 15): `auto` is the CPU for them even where a GPU exists (their
networks are too small for one to pay), a device that is not there is one line and exit 2, and the collected
rollout lives where the networks are."""

import pytest
import torch

from advantage import cli
from advantage.rl.common import Session, make_env
from advantage.rl.networks import Policy, ValueFunction
from advantage.rl.ppo import PPOConfig
from advantage.rl.rollout import Collector


def test_auto_is_the_cpu_for_the_classic_algorithms_even_with_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    session = Session("ppo", PPOConfig(device="auto"), tmp_path / "run", False, iterations=1, steps_per_iteration=1)
    assert session.device == torch.device("cpu")


@pytest.mark.parametrize("algorithm", ["ppo", "dqn"])
def test_a_gpu_that_is_not_there_is_one_line_exit_2_and_no_run_directory(algorithm, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    code = cli.main(["train", algorithm, "--env-id", "CartPole-v1", "--total-steps", "512", "--device", "cuda",
                     "--progress", "false", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "field 'device'" in lines[0], lines
    assert not out.exists()


def test_the_rollout_is_on_the_networks_device_and_matches_the_modules():
    """Collection steps on a CPU copy of the weights; what it returns is on the networks' device (the CPU here) and
    its log-probabilities and values are those of the modules themselves."""
    config = PPOConfig(env_id="Pendulum-v1", num_envs=2)
    env, space = make_env(config)
    torch.manual_seed(0)
    policy, critic = Policy(space), ValueFunction(space.observation_dim)
    collector = Collector(env, space, torch.Generator().manual_seed(0))
    collector.reset(seed=1)
    rollout = collector.collect(policy, critic, num_steps=16, start_step=0, finished=[])
    env.close()
    device = policy.log_std.device
    assert all(getattr(rollout, name).device == device for name in vars(rollout))
    with torch.no_grad():
        params = policy(rollout.observations)
        assert torch.allclose(policy.log_prob(params, rollout.actions), rollout.log_probs, atol=1e-5)
        assert torch.allclose(critic(rollout.observations), rollout.values, atol=1e-5)
