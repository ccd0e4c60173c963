"""Collecting experience from a vector environment into time-major tensors.

Layout (T steps, N environments): every field is (T, N, ...). Conventions shared with advantage.objectives.returns:

- `next_values[t]` is V(s_{t+1}) where s_{t+1} is the observation the step returned. Under Gymnasium's NEXT_STEP
  autoreset that is the true final observation when the episode ended, so truncation bootstraps from the right
  value with no extra bookkeeping (CleanRL's long-standing truncation issue does not arise).
- `valid[t]` is 0 on reset steps (the step after an episode ended, which only resets that sub-environment);
  those steps are masked out of every loss. Because they always follow an episode end, the return recursions
  never cross them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from advantage.objectives.masking import fill_padding
from advantage.rl.envs import SpaceInfo
from advantage.rl.fused_forward import fused_forward
from advantage.rl.networks import Policy, ValueFunction


@dataclass
class Rollout:
    """T steps of N environments, time-major.

    observations (T, N, obs_dim); actions (T, N) int64 or (T, N, D); log_probs (T, N) under the collecting policy;
    values (T, N) V(s_t) at collection time; next_values (T, N) V(s_{t+1}); rewards (T, N);
    terminated, truncated (T, N) bool; valid (T, N) float, 0 on reset steps.
    """

    observations: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    next_values: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor

    def flat(self, name: str) -> Tensor:
        """Field `name` with the (T, N) axes merged into one, keeping only valid steps."""
        value = getattr(self, name)
        keep = self.valid.reshape(-1).bool()
        return value.reshape(-1, *value.shape[2:])[keep]


@dataclass
class FinishedEpisode:
    """An episode that ended during collection: its return, length and the global step at which it ended."""

    episode_return: float
    length: int
    step: int


class Collector:
    """Steps a vector environment with a policy and keeps the state that outlives one rollout.

    Args:
        env: a Gymnasium vector environment in NEXT_STEP autoreset mode.
        space: its SpaceInfo.
        generator: the torch generator used for sampling actions (saved in checkpoints for exact resume).
    """

    def __init__(self, env: gym.vector.VectorEnv, space: SpaceInfo, generator: torch.Generator):
        self.env = env
        self.space = space
        self.generator = generator
        self.num_envs = env.num_envs
        self.observation: np.ndarray | None = None
        self.reset_pending = np.zeros(self.num_envs, dtype=bool)
        self.episode_returns = np.zeros(self.num_envs, dtype=np.float64)
        self.episode_lengths = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, seed: int) -> None:
        """Start fresh episodes in every sub-environment (partial episodes are dropped from the statistics)."""
        observation, _ = self.env.reset(seed=seed)
        self.observation = np.asarray(observation, dtype=np.float32)
        self.reset_pending[:] = False
        self.episode_returns[:] = 0.0
        self.episode_lengths[:] = 0

    def _to_env(self, actions: np.ndarray) -> np.ndarray:
        if self.space.discrete:
            return actions
        return np.clip(actions, self.space.action_low, self.space.action_high)

    def step(self, actions: np.ndarray, step_counter: int,
             finished: list[FinishedEpisode]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One vector step: returns (next observation, reward, terminated, truncated, valid) and records episodes.

        Episode returns are those of the environment's own reward: when a reward wrapper (normalisation) sits on
        top, Gymnasium's RecordEpisodeStatistics below it reports them in `info["episode"]`.
        """
        valid = ~self.reset_pending
        next_observation, reward, terminated, truncated, info = self.env.step(self._to_env(actions))
        done = (terminated | truncated) & valid
        if "episode" in info:
            for index in np.flatnonzero(info["_episode"]):
                finished.append(FinishedEpisode(float(info["episode"]["r"][index]),
                                                int(info["episode"]["l"][index]), step_counter))
        else:
            self.episode_returns += np.where(valid, reward, 0.0)
            self.episode_lengths += valid
            if done.any():
                for index in np.flatnonzero(done):
                    finished.append(FinishedEpisode(float(self.episode_returns[index]),
                                                    int(self.episode_lengths[index]), step_counter))
                self.episode_returns[done] = 0.0
                self.episode_lengths[done] = 0
        self.reset_pending = done
        self.observation = np.asarray(next_observation, dtype=np.float32)
        return self.observation, reward, terminated & valid, truncated & valid, valid

    def collect(self, policy: Policy, critic: ValueFunction | None, num_steps: int, start_step: int,
                finished: list[FinishedEpisode], one_episode_each: bool = False) -> Rollout:
        """Run `num_steps` vector steps with `policy`; V(s) from `critic` (None: zeros, for REINFORCE).

        `start_step` is the global environment-step count before this rollout (for episode records).
        `one_episode_each`: stop as soon as every sub-environment has finished one episode (at most `num_steps`
        steps) and mark everything after each one's first episode invalid: a batch of whole episodes, as
        Monte Carlo REINFORCE needs. Call `reset` before each such rollout.
        Actions are drawn from pre-sampled noise (Gumbel-max for categoricals, mean + std * N(0, 1) for
        Gaussians): exactly pi's distribution, and one generator call per rollout instead of one per step.
        The steps run on the CPU (`fused_forward` copies the weights there); the returned Rollout lives on the
        networks' device, where the update runs, so a GPU sees one transfer per rollout.
        """
        assert self.observation is not None, "call reset() first"
        n, steps = self.num_envs, num_steps
        outputs_dim = self.space.action_dim
        forward = fused_forward(policy, critic)
        observations = np.empty((steps, n, self.space.observation_dim), dtype=np.float32)
        outputs = torch.empty(steps + 1, n, outputs_dim + 1)
        actions = torch.empty((steps, n), dtype=torch.int64) if self.space.discrete else \
            torch.empty(steps, n, outputs_dim)
        rewards = np.empty((steps, n), dtype=np.float32)
        terminated = np.empty((steps, n), dtype=bool)
        truncated = np.empty((steps, n), dtype=bool)
        valid = np.empty((steps, n), dtype=bool)
        episode_over = np.zeros(n, dtype=bool)
        with torch.inference_mode():
            if self.space.discrete:
                uniform = torch.rand(steps, n, outputs_dim, generator=self.generator).clamp_(1e-12, 1.0 - 1e-7)
                noise = -torch.log(-torch.log(uniform))  # Gumbel(0, 1): argmax(logits + noise) ~ softmax(logits)
            else:
                std = policy.log_std.detach().cpu().exp()
                noise = torch.randn(steps, n, outputs_dim, generator=self.generator) * std
            for t in range(steps):
                observations[t] = self.observation
                out = forward(torch.from_numpy(self.observation))  # (n, P + 1)
                outputs[t] = out
                if self.space.discrete:
                    action = (out[:, :outputs_dim] + noise[t]).argmax(-1)
                else:
                    action = out[:, :outputs_dim] + noise[t]
                actions[t] = action
                _, rewards[t], terminated[t], truncated[t], valid[t] = self.step(
                    action.numpy(), start_step + (t + 1) * n, finished)
                if one_episode_each:
                    valid[t] &= ~episode_over
                    episode_over |= terminated[t] | truncated[t]
                    if episode_over.all():
                        steps = t + 1
                        break
            outputs[steps] = forward(torch.from_numpy(self.observation))
            device = policy.body[0].weight.device
            outputs = outputs[:steps + 1].to(device)
            actions = actions[:steps].to(device)
            log_probs = policy.log_prob(outputs[:steps, :, :outputs_dim], actions)
        values = outputs[:, :, outputs_dim]
        valid_mask = torch.from_numpy(valid[:steps]).to(device=device, dtype=torch.float32)

        def on_device(array: np.ndarray) -> Tensor:
            return torch.from_numpy(array[:steps]).to(device)

        return Rollout(on_device(observations), actions, log_probs.clone(), values[:-1].clone(), values[1:].clone(),
                       fill_padding(on_device(rewards), valid_mask), on_device(terminated) & valid_mask.bool(),
                       on_device(truncated) & valid_mask.bool(), valid_mask)
