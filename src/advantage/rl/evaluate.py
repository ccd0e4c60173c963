"""Evaluate the final policy of a run directory: mean and std of the episode return."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from advantage.errors import UsageError
from advantage.rl.envs import load_normalization_state, make_vector_env, space_info
from advantage.rl.networks import Policy
from advantage.run.checkpoint import load_weights
from advantage.run.config import load_yaml_mapping


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
