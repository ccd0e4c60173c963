"""Evaluate the final policy of a run directory: mean and std of the episode return."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from advantage.errors import UsageError
from advantage.rl.envs import load_normalization_state, make_vector_env, space_info
from advantage.rl.networks import Policy, QNetwork
from advantage.run.checkpoint import load_weights
from advantage.run.config import load_yaml_mapping


class GreedyQPolicy:
    """The Policy interface evaluation needs, for a Q-network: mode = argmax Q, sample = epsilon-greedy."""

    def __init__(self, q_network: QNetwork, epsilon: float):
        self.q_network, self.epsilon = q_network, epsilon

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        return self.q_network(observations)

    def mode(self, q_values: torch.Tensor) -> torch.Tensor:
        """The greedy action."""
        return q_values.argmax(-1)

    def sample(self, q_values: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        """Epsilon-greedy, as during training at its final epsilon."""
        explore = torch.rand(q_values.shape[0], generator=generator) < self.epsilon
        random = torch.randint(0, q_values.shape[-1], (q_values.shape[0],), generator=generator)
        return torch.where(explore, random, q_values.argmax(-1)), None


def evaluate_run(run_dir: Path, episodes: int, seed: int, deterministic: bool = True) -> dict[str, Any]:
    """Run `episodes` episodes with RUN_DIR/final's policy; returns {"mean_return", "std_return", ...}."""
    if episodes < 1:
        raise UsageError("--episodes must be >= 1")
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    if not (run_dir / "final" / "model.safetensors").exists():
        raise UsageError(f"{run_dir}: the run has not finished (no final/model.safetensors)")
    config = load_yaml_mapping(config_path)
    env = make_vector_env(config["env_id"], 1, "sync", bool(config.get("normalize_observation")), False)
    normalization = run_dir / "final" / "normalization.json"
    if normalization.exists():
        load_normalization_state(env, json.loads(normalization.read_text()), frozen=True)
    space = space_info(env, config["env_id"])
    hidden = tuple(int(h) for h in str(config.get("hidden_sizes", "64,64")).split(","))
    if config.get("algorithm") == "dqn":
        # DQN has no policy network: act greedily (or epsilon-greedily with end_epsilon) on Q.
        q_network = QNetwork(space.observation_dim, space.action_dim, hidden, str(config.get("activation", "relu")))
        load_weights(run_dir / "final", {"q": q_network})
        policy = GreedyQPolicy(q_network, float(config.get("end_epsilon", 0.0)))
    else:
        policy = Policy(space, hidden, activation=str(config.get("activation", "tanh")))
        load_weights(run_dir / "final", {"policy": policy})
    generator = torch.Generator().manual_seed(seed)
    returns: list[float] = []
    observation, _ = env.reset(seed=seed)
    total = 0.0
    with torch.inference_mode():
        while len(returns) < episodes:
            params = policy(torch.as_tensor(observation, dtype=torch.float32))
            action = policy.mode(params) if deterministic else policy.sample(params, generator)[0]
            action = action.numpy()
            if not space.discrete:
                action = action.clip(space.action_low, space.action_high)
            observation, reward, terminated, truncated, _ = env.step(action)
            total += float(reward[0])
            if terminated[0] or truncated[0]:
                returns.append(total)
                total = 0.0
                observation, _ = env.step(action)[0], None  # NEXT_STEP autoreset: this step only resets
    env.close()
    return {"run_dir": str(run_dir), "episodes": episodes, "mean_return": statistics.fmean(returns),
            "std_return": statistics.pstdev(returns), "deterministic": deterministic}
