"""Gymnasium vector environments: creation, normalisation wrappers and their saved state.

Every environment is stepped through Gymnasium's vector API (`gymnasium.make_vec`): its own vectorised
implementation where the environment has one (CartPole), otherwise `SyncVectorEnv` or `AsyncVectorEnv`.
Gymnasium 1.x resets finished sub-environments in the *next* step (autoreset mode NEXT_STEP): the step that ends
an episode returns the true final observation, and the following step of that sub-environment is a reset step
whose reward and action mean nothing. The rollout code masks those reset steps out (advantage.rl.rollout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import vector as vector_wrappers

from advantage.errors import UsageError

Vectorization = Literal["auto", "sync", "async"]


@dataclass(frozen=True)
class SpaceInfo:
    """What the networks need to know about an environment.

    observation_dim: length of the flat observation vector.
    discrete: True for a Discrete action space (categorical policy), False for Box (diagonal Gaussian).
    action_dim: number of actions (discrete) or action dimensions (Box).
    action_low, action_high: bounds of a Box action space (None for discrete).
    """

    observation_dim: int
    discrete: bool
    action_dim: int
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None


def space_info(env: gym.vector.VectorEnv, env_id: str) -> SpaceInfo:
    """Check that the spaces are supported (flat Box observations; Discrete or Box actions) and describe them."""
    observation_space = env.single_observation_space
    action_space = env.single_action_space
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise UsageError(f"env '{env_id}': unsupported observation space {observation_space} "
                         f"(flat Box observations only)")
    if isinstance(action_space, gym.spaces.Discrete):
        return SpaceInfo(observation_space.shape[0], True, int(action_space.n))
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return SpaceInfo(observation_space.shape[0], False, action_space.shape[0],
                         action_space.low.astype(np.float32), action_space.high.astype(np.float32))
    raise UsageError(f"env '{env_id}': unsupported action space {action_space} (Discrete or flat Box only)")


def action_space_kind(env_id: str) -> str | None:
    """"Box" or "Discrete": the kind of `env_id`'s action space (one environment is made and closed to see it), or
    None when it cannot be made (the run then fails later with the environment's own error)."""
    try:
        env = gym.make(env_id)
    except Exception:  # noqa: BLE001 - any failure here is reported where the run makes its environments
        return None
    try:
        space = env.action_space
        return "Box" if isinstance(space, gym.spaces.Box) else "Discrete" if isinstance(space, gym.spaces.Discrete) \
            else None
    finally:
        env.close()


def make_vector_env(env_id: str, num_envs: int, vectorization: Vectorization = "auto",
                    normalize_observation: bool = False, normalize_reward: bool = False, gamma: float = 0.99,
                    clip_observation: float = 10.0, clip_reward: float = 10.0,
                    env_kwargs: dict[str, Any] | None = None) -> gym.vector.VectorEnv:
    """Create `num_envs` copies of `env_id` behind one vector interface, with optional normalisation.

    Args:
        vectorization: "auto" uses the environment's own vector implementation if it registered one, else sync.
        normalize_observation: running mean/std observation normalisation, then clipping to +-clip_observation.
        normalize_reward: scale rewards by the running std of the discounted return (gamma), then clip.
    Raises:
        UsageError: unknown environment id, or one that cannot be vectorised as asked.
    """
    mode = {"auto": None, "sync": "sync", "async": "async"}[vectorization]
    try:
        gym.spec(env_id)
    except (gym.error.Error, ValueError, ModuleNotFoundError, ImportError) as error:
        raise UsageError(f"unknown environment '{env_id}' ({str(error).splitlines()[0]})") from None
    try:
        env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode, **(env_kwargs or {}))
    except (gym.error.Error, ModuleNotFoundError, ImportError, TypeError) as error:
        raise UsageError(f"cannot create environment '{env_id}': {str(error).splitlines()[0]}") from None
    if env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP) != AutoresetMode.NEXT_STEP:
        raise UsageError(f"env '{env_id}': autoreset mode {env.metadata['autoreset_mode']} is not supported")
    if normalize_observation:
        env = vector_wrappers.NormalizeObservation(env)
        env = vector_wrappers.TransformObservation(
            env, lambda obs: np.clip(obs, -clip_observation, clip_observation), env.observation_space)
    if normalize_reward:
        # Below the reward wrappers, so that episodes.jsonl reports the environment's own returns.
        env = vector_wrappers.RecordEpisodeStatistics(env)
        env = vector_wrappers.NormalizeReward(env, gamma=gamma)
        env = vector_wrappers.ClipReward(env, -clip_reward, clip_reward)
    return env


def _find(env: gym.vector.VectorEnv, kind: type) -> Any:
    while True:
        if isinstance(env, kind):
            return env
        if not hasattr(env, "env"):
            return None
        env = env.env


def normalization_state(env: gym.vector.VectorEnv) -> dict[str, list[float] | float]:
    """The running statistics of the normalisation wrappers, as plain lists (for checkpoints and final/)."""
    state: dict[str, Any] = {}
    observation = _find(env, vector_wrappers.NormalizeObservation)
    if observation is not None:
        state["obs_mean"] = observation.obs_rms.mean.tolist()
        state["obs_var"] = observation.obs_rms.var.tolist()
        state["obs_count"] = float(observation.obs_rms.count)
    reward = _find(env, vector_wrappers.NormalizeReward)
    if reward is not None:
        state["return_mean"] = float(reward.return_rms.mean)
        state["return_var"] = float(reward.return_rms.var)
        state["return_count"] = float(reward.return_rms.count)
    return state


def load_normalization_state(env: gym.vector.VectorEnv, state: dict[str, Any], frozen: bool = False) -> None:
    """Restore what `normalization_state` saved; `frozen` stops further updates (evaluation)."""
    observation = _find(env, vector_wrappers.NormalizeObservation)
    if observation is not None and "obs_mean" in state:
        observation.obs_rms.mean = np.asarray(state["obs_mean"], dtype=np.float64)
        observation.obs_rms.var = np.asarray(state["obs_var"], dtype=np.float64)
        observation.obs_rms.count = float(state["obs_count"])
        if frozen:
            observation.update_running_mean = False
    reward = _find(env, vector_wrappers.NormalizeReward)
    if reward is not None and "return_mean" in state:
        reward.return_rms.mean = np.asarray(state["return_mean"], dtype=np.float64)
        reward.return_rms.var = np.asarray(state["return_var"], dtype=np.float64)
        reward.return_rms.count = float(state["return_count"])
        if frozen:
            reward.update_running_mean = False
