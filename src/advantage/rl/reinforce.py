"""REINFORCE / vanilla policy gradient (docs/math.md §1 and §7): sample whole episodes with pi_theta, weight every
log pi(a_t|s_t) by psi_t, step along (1/N) sum_n sum_t psi_t grad log pi(a_t|s_t).

psi (forms 1-3 of the policy-gradient template, docs/math.md §1): the episode's total return, or the reward-to-go,
optionally minus a baseline, the batch mean (the notes' b ~ E[R(tau)]) or a learned V(s_t) (their B(s_t), which makes it
actor-critic-like while staying Monte Carlo). One iteration = one episode in each of the `num_envs` environments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import gymnasium as gym
import torch
from torch import nn

from advantage.objectives.masking import fill_padding, masked_mean
from advantage.objectives.policy_gradient import (
    explained_variance,
    normalize_advantages,
    policy_gradient_loss,
    psi,
    value_loss,
)
from advantage.rl.common import RLConfig, Session, check_gamma, make_env, torch_generator, validate_common
from advantage.rl.networks import Policy, ValueFunction
from advantage.rl.rollout import Collector, FinishedEpisode
from advantage.run.config import param, require
from advantage.run.session import Run


@dataclass
class ReinforceConfig(RLConfig):
    """REINFORCE's hyperparameters (for Box actions, BOX_DEFAULTS)."""

    # Box (continuous) actions and no preset: Spinning Up's vanilla policy gradient for MuJoCo (policy Adam 3e-4,
    # critic 1e-3 fitted 80 steps a batch) with observation normalisation; the discrete defaults' 3e-3 makes a
    # Gaussian policy's log std collapse within a few batches.
    BOX_DEFAULTS: ClassVar[dict[str, object]] = {
        "learning_rate": 3e-4, "value_learning_rate": 1e-3, "value_epochs": 80, "normalize_observation": True}

    num_envs: int = param(8, "parallel environments = episodes per batch")
    psi: Literal["total_return", "reward_to_go"] = param("reward_to_go",
                                                         "weight of grad log pi: psi_1 or psi_2 (docs/math.md §1)")
    baseline: Literal["none", "mean", "value"] = param("value", "subtract nothing, the batch mean, or a learned V(s_t)")
    gamma: float = param(0.99, "discount gamma")
    learning_rate: float = param(3e-3, "Adam learning rate of the policy")
    value_learning_rate: float = param(1e-2, "Adam learning rate of the baseline V(s) (baseline=value)")
    value_epochs: int = param(5, "gradient steps on the baseline per batch (baseline=value)")
    normalize_advantage: bool = param(True, "standardise psi over the batch (a further mean baseline and a scale)")
    max_episode_steps: int = param(0, "cap on an episode's length in a batch; 0 = the environment's time limit or 1000")
    max_grad_norm: float = param(0.0, "global gradient-norm clip (0 disables)")


CONFIG = ReinforceConfig


def validate(config: ReinforceConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_common(config)
    check_gamma(config.gamma)
    require(config.learning_rate > 0, "learning_rate", "must be > 0", config.learning_rate)
    require(config.value_learning_rate > 0, "value_learning_rate", "must be > 0", config.value_learning_rate)
    require(config.value_epochs >= 1, "value_epochs", "must be >= 1", config.value_epochs)
    require(config.max_episode_steps >= 0, "max_episode_steps", "must be >= 0", config.max_episode_steps)
    require(config.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", config.max_grad_norm)


def train(config: ReinforceConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Train REINFORCE on `config.env_id`, writing the run directory; returns the Run."""
    validate(config)
    torch.set_num_threads(config.threads)
    env, space = make_env(config)
    spec = gym.spec(config.env_id)
    horizon = config.max_episode_steps or (spec.max_episode_steps or 1000)
    # Iterations are counted in expected batches of full-length episodes; the run stops at total_steps anyway.
    session = Session("reinforce", config, run_dir, resume, iterations=max(1, config.total_steps // config.num_envs),
                      steps_per_iteration=config.num_envs)
    session.checkpoint_every = 10  # iterations here are single batches of episodes: checkpoint every 10 of them
    torch.manual_seed(config.seed)
    policy = Policy(space, **config.networks()).to(session.device)
    critic = ValueFunction(space.observation_dim, **config.networks()).to(session.device) \
        if config.baseline == "value" else None
    modules: dict[str, nn.Module] = {"policy": policy, **({"critic": critic} if critic is not None else {})}
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=config.value_learning_rate) if critic else None
    generator = torch_generator(config.seed)
    optimizers = {"optimizer": optimizer, **({"critic_optimizer": critic_optimizer} if critic_optimizer else {})}
    session.restore(modules, optimizers, generator, env)
    collector = Collector(env, space, generator)
    step, iteration = session.start_step, session.start_iteration
    finished: list[FinishedEpisode] = []
    last: dict = {}

    while step < config.total_steps:
        # 1. A batch of whole episodes, one per environment, from a fresh reset (docs/math.md §1: tau ~ p_theta(tau)).
        collector.reset(session.environment_seed(iteration))
        rollout = collector.collect(policy, critic, horizon, step, finished, one_episode_each=True)
        step += rollout.rewards.shape[0] * config.num_envs
        iteration += 1
        # Batch-major (N, T): one row per episode, as the seeds' 1/N sum_n sum_t.
        rewards, valid = rollout.rewards.T, rollout.valid.T
        terminated, truncated = rollout.terminated.T, rollout.truncated.T
        values = rollout.values.T if critic is not None else None

        # 2. psi_t: total return or reward-to-go (psi_1/psi_2, docs/math.md §1), minus the baseline (psi_3).
        weights = psi(config.psi, rewards, config.gamma, terminated=terminated, truncated=truncated,
                      next_values=rollout.next_values.T if critic is not None else None, mask=valid, dim=1)
        returns = psi("reward_to_go", rewards, config.gamma, terminated=terminated, truncated=truncated,
                      next_values=rollout.next_values.T if critic is not None else None, mask=valid, dim=1)
        if config.baseline == "mean":
            weights = fill_padding(weights - masked_mean(weights, valid), valid)
        elif config.baseline == "value":
            weights = fill_padding(weights - values, valid)
        if config.normalize_advantage:
            weights = normalize_advantages(weights, valid)

        # 3. One ascent step on (1/N) sum_n sum_t psi_t log pi(a_t|s_t) (the seeds' estimator).
        observations = rollout.observations.transpose(0, 1)  # (N, T, obs_dim)
        params = policy(observations)
        log_probs = policy.log_prob(params, rollout.actions.transpose(0, 1))
        loss = policy_gradient_loss(log_probs, weights, valid, aggregation="constant", constant_length=1.0)
        grad_norm = float("nan")
        if session.finite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm or float("inf")))
            optimizer.step()

        # 4. The learned baseline regresses on the Monte Carlo reward-to-go.
        critic_loss = None
        if critic is not None:
            for _ in range(config.value_epochs):
                critic_loss = value_loss(critic(observations), returns, valid)
                critic_optimizer.zero_grad(set_to_none=True)
                critic_loss.backward()
                critic_optimizer.step()

        # 5. Log and checkpoint.
        recent = session.record_episodes(finished)
        with torch.no_grad():
            entropy = masked_mean(policy.entropy(params.reshape(-1, params.shape[-1])).reshape(valid.shape), valid)
        elapsed = session.elapsed()
        logged = {"losses/policy": float(loss.detach()), "losses/entropy": float(entropy),
                  "losses/grad_norm": grad_norm, "charts/episodes_per_batch": config.num_envs,
                  "charts/sps": session.steps_per_second(step),
                  "charts/skipped_updates": session.skipped_updates}
        if critic is not None:
            logged["losses/value"] = float(critic_loss.detach())
            logged["value/explained_variance"] = float(explained_variance(values, returns, valid))
        last = session.metrics.log(step, elapsed, logged)
        session.show(step, recent, logged["charts/sps"])
        if iteration % session.checkpoint_every == 0 or step >= config.total_steps:
            session.save(iteration, step)

    session.finish(step)
    env.close()
    return Run(Path(run_dir), "reinforce", config, last, step)
