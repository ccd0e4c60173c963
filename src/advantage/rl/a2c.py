"""A2C, advantage actor-critic (docs/math.md §7): the actor follows E[grad log pi(a|s) A(s,a)], the critic V_w regresses
by 1/2 (target - V_w(s))^2; the advantage is the n-step one of docs/math.md §2 (A^n = delta_t + ... + gamma^(n-1)
delta_{t+n-1}) or GAE(gamma, lambda). One gradient step per short rollout of all environments (synchronous).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from advantage.objectives.masking import masked_mean
from advantage.objectives.policy_gradient import (
    explained_variance,
    normalize_advantages,
    policy_gradient_loss,
    value_loss,
)
from advantage.objectives.returns import gae, n_step_advantage
from advantage.rl.common import RLConfig, Session, check_gamma, make_env, torch_generator, validate_common
from advantage.rl.flat_parameters import FlatParameters
from advantage.rl.networks import Policy, ValueFunction
from advantage.rl.rollout import Collector, FinishedEpisode
from advantage.run.config import param, require
from advantage.run.session import Run


@dataclass
class A2CConfig(RLConfig):
    """A2C's hyperparameters (defaults close to Stable-Baselines3's A2C; for Box actions, BOX_DEFAULTS)."""

    # Box (continuous) actions and no preset: rl-baselines3-zoo's MuJoCo entries for A2C keep SB3's A2C settings
    # and add observation normalisation (MuJoCo's observations span orders of magnitude).
    BOX_DEFAULTS: ClassVar[dict[str, object]] = {"normalize_observation": True}

    num_envs: int = param(8, "parallel environments")
    num_steps: int = param(5, "steps per environment per update (the n of the n-step advantage)")
    advantage: Literal["n_step", "gae"] = param("n_step", "n-step advantage or GAE(gamma, lambda) (docs/math.md §2)")
    gamma: float = param(0.99, "discount gamma")
    gae_lambda: float = param(1.0, "GAE lambda (advantage=gae)")
    learning_rate: float = param(7e-4, "learning rate")
    optimizer: Literal["rmsprop", "adam"] = param("rmsprop", "RMSprop (as the A3C paper and SB3) or Adam")
    anneal_lr: bool = param(False, "decay the learning rate linearly to 0 over the run")
    ent_coef: float = param(0.0, "entropy bonus coefficient")
    vf_coef: float = param(1.0, "value-loss coefficient (1.0 on our 1/2 (G - V)^2 equals SB3's 0.5 on its MSE)")
    max_grad_norm: float = param(0.5, "global gradient-norm clip (0 disables)")
    normalize_advantage: bool = param(False, "standardise advantages over each batch")
    initial_log_std: float = param(0.0, "initial log std of a Gaussian policy")


CONFIG = A2CConfig


def validate(config: A2CConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_common(config)
    check_gamma(config.gamma)
    check_gamma(config.gae_lambda, "gae_lambda")
    require(config.num_steps > 0, "num_steps", "must be > 0", config.num_steps)
    require(config.learning_rate > 0, "learning_rate", "must be > 0", config.learning_rate)
    require(config.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", config.max_grad_norm)


def train(config: A2CConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Train A2C on `config.env_id`, writing the run directory; returns the Run."""
    validate(config)
    torch.set_num_threads(config.threads)
    batch_size = config.num_steps * config.num_envs
    iterations = max(1, config.total_steps // batch_size)
    session = Session("a2c", config, run_dir, resume, iterations, batch_size, unit="rollout")
    env, space = make_env(config)
    torch.manual_seed(config.seed)
    policy = Policy(space, initial_log_std=config.initial_log_std, **config.networks())
    critic = ValueFunction(space.observation_dim, **config.networks()).to(session.device)
    policy.to(session.device)
    modules: dict[str, nn.Module] = {"policy": policy, "critic": critic}
    flat = FlatParameters([policy, critic])
    if config.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop([flat.flat], lr=config.learning_rate, alpha=0.99, eps=1e-5)
    else:
        optimizer = torch.optim.Adam([flat.flat], lr=config.learning_rate, eps=1e-5, fused=True)
    generator = torch_generator(config.seed)
    session.restore(modules, {"optimizer": optimizer}, generator, env)
    collector = Collector(env, space, generator)
    step = session.start_step
    finished: list[FinishedEpisode] = []
    last: dict = {}

    for iteration in range(session.start_iteration, iterations):
        if session.segment_starts(iteration):
            collector.reset(session.environment_seed(iteration))
        lr = config.learning_rate * ((1.0 - iteration / iterations) if config.anneal_lr else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1. A short rollout of every environment with the current policy.
        rollout = collector.collect(policy, critic, config.num_steps, step, finished)
        step += batch_size

        # 2. Advantages: the n-step form of docs/math.md §2 (bootstrapped from V at the rollout's end), or GAE.
        if config.advantage == "n_step":
            advantages = n_step_advantage(rollout.rewards, rollout.values, rollout.next_values, config.gamma,
                                          config.num_steps, rollout.terminated, rollout.truncated, rollout.valid)
        else:
            advantages = gae(rollout.rewards, rollout.values, rollout.next_values, config.gamma, config.gae_lambda,
                             rollout.terminated, rollout.truncated, rollout.valid)
        targets = advantages + rollout.values  # the critic's regression target r + gamma V(s') ... (docs/math.md §2)
        weights = normalize_advantages(advantages, rollout.valid) if config.normalize_advantage else advantages

        # 3. One step on actor and critic together: -E[A log pi] + c_v * 1/2 (target - V)^2 - c_e * H(pi).
        observations = rollout.observations.reshape(-1, space.observation_dim)
        params = policy(observations)
        log_probs = policy.log_prob(params, rollout.actions.reshape(batch_size, *rollout.actions.shape[2:]))
        valid = rollout.valid.reshape(-1)
        policy_loss = policy_gradient_loss(log_probs, weights.reshape(-1), valid)
        entropy = masked_mean(policy.entropy(params), valid)
        critic_loss = value_loss(critic(observations), targets.reshape(-1), valid)
        loss = policy_loss - config.ent_coef * entropy + config.vf_coef * critic_loss
        grad_norm = float("nan")
        if session.finite(loss):
            grad_norm = float(flat.descend(loss, optimizer, config.max_grad_norm))

        # 4. Log and checkpoint.
        recent = session.record_episodes(finished)
        if iteration % 20 == 19 or session.checkpoint_due(iteration + 1):  # a line per 20 updates: A2C's are tiny
            elapsed = session.elapsed()
            last = session.metrics.log(step, elapsed, {
                "losses/policy": float(policy_loss.detach()), "losses/value": float(critic_loss.detach()),
                "losses/entropy": float(entropy.detach()), "losses/grad_norm": grad_norm,
                "value/explained_variance": float(explained_variance(rollout.values, targets, rollout.valid)),
                "charts/learning_rate": lr,
                "charts/sps": session.steps_per_second(step),
                "charts/skipped_updates": session.skipped_updates})
            session.show(step, recent, last["charts/sps"])
        if session.checkpoint_due(iteration + 1):
            session.save(iteration + 1, step)

    session.finish(step)
    env.close()
    return Run(Path(run_dir), "a2c", config, last, step)
