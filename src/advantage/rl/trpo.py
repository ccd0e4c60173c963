"""TRPO (docs/math.md §3 and §7): maximise the importance-sampled surrogate L^CPI subject to a mean-KL trust region,
by a natural-gradient step (conjugate gradient on Fisher-vector products) and a backtracking line search that
accepts only a step whose actual KL stays within delta and whose actual surrogate improves. The critic is fitted
by regression on the lambda-returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from advantage.objectives.policy_gradient import explained_variance, normalize_advantages, value_loss
from advantage.objectives.ppo import cpi_loss
from advantage.objectives.returns import gae
from advantage.objectives.trust_region import (
    backtracking_line_search,
    fisher_vector_product,
    flat_grad,
    natural_gradient_step,
)
from advantage.rl.common import RLConfig, Session, check_gamma, make_env, torch_generator, validate_common
from advantage.rl.networks import Policy, ValueFunction
from advantage.rl.rollout import Collector, FinishedEpisode
from advantage.run.config import param, require
from advantage.run.session import Run


@dataclass
class TRPOConfig(RLConfig):
    """TRPO's hyperparameters (defaults close to Stable-Baselines3's TRPO; for Box actions, BOX_DEFAULTS)."""

    # Box (continuous) actions and no preset: one environment x 2,048 steps as sb3-contrib's TRPO, with the
    # observation and return normalisation that the MuJoCo TRPO set-ups of rl-baselines3-zoo use.
    BOX_DEFAULTS: ClassVar[dict[str, object]] = {
        "num_envs": 1, "num_steps": 2048, "normalize_observation": True, "normalize_reward": True}

    num_envs: int = param(4, "parallel environments")
    num_steps: int = param(512, "steps per environment per iteration (batch = num_steps x num_envs)")
    gamma: float = param(0.99, "discount gamma")
    gae_lambda: float = param(0.95, "GAE lambda")
    max_kl: float = param(0.01, "delta: the trust region's bound on the mean KL(pi_old || pi_new)")
    cg_iterations: int = param(15, "conjugate-gradient iterations")
    cg_damping: float = param(0.1, "damping added to the Fisher matrix")
    line_search_steps: int = param(10, "backtracking steps of the line search")
    line_search_shrink: float = param(0.8, "step shrink factor per backtracking step")
    normalize_advantage: bool = param(True, "standardise advantages over the batch")
    value_learning_rate: float = param(1e-3, "Adam learning rate of the critic")
    value_epochs: int = param(10, "epochs of critic regression per iteration")
    value_minibatches: int = param(16, "minibatches per critic epoch")
    initial_log_std: float = param(0.0, "initial log std of a Gaussian policy")


CONFIG = TRPOConfig


def validate(config: TRPOConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_common(config)
    check_gamma(config.gamma)
    check_gamma(config.gae_lambda, "gae_lambda")
    require(config.num_steps > 0, "num_steps", "must be > 0", config.num_steps)
    require(config.max_kl > 0, "max_kl", "must be > 0", config.max_kl)
    require(config.cg_iterations >= 1, "cg_iterations", "must be >= 1", config.cg_iterations)
    require(config.cg_damping >= 0, "cg_damping", "must be >= 0", config.cg_damping)
    require(config.line_search_steps >= 1, "line_search_steps", "must be >= 1", config.line_search_steps)
    require(0 < config.line_search_shrink < 1, "line_search_shrink", "must be in (0, 1)", config.line_search_shrink)
    require(config.value_learning_rate > 0, "value_learning_rate", "must be > 0", config.value_learning_rate)
    require(config.value_epochs >= 1, "value_epochs", "must be >= 1", config.value_epochs)
    require(config.value_minibatches >= 1, "value_minibatches", "must be >= 1", config.value_minibatches)


def train(config: TRPOConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Train TRPO on `config.env_id`, writing the run directory; returns the Run."""
    validate(config)
    torch.set_num_threads(config.threads)
    batch_size = config.num_steps * config.num_envs
    iterations = max(1, config.total_steps // batch_size)
    session = Session("trpo", config, run_dir, resume, iterations, batch_size, unit="rollout")
    env, space = make_env(config)
    torch.manual_seed(config.seed)
    policy = Policy(space, initial_log_std=config.initial_log_std, **config.networks())
    critic = ValueFunction(space.observation_dim, **config.networks()).to(session.device)
    policy.to(session.device)
    modules: dict[str, nn.Module] = {"policy": policy, "critic": critic}
    policy_parameters = list(policy.parameters())
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=config.value_learning_rate)
    generator = torch_generator(config.seed)
    session.restore(modules, {"critic_optimizer": critic_optimizer}, generator, env)
    collector = Collector(env, space, generator)
    step = session.start_step
    finished: list[FinishedEpisode] = []
    last: dict = {}

    for iteration in range(session.start_iteration, iterations):
        if session.segment_starts(iteration):
            collector.reset(session.environment_seed(iteration))

        # 1. Collect with pi_old; advantages by GAE.
        rollout = collector.collect(policy, critic, config.num_steps, step, finished)
        step += batch_size
        advantages, returns = gae(rollout.rewards, rollout.values, rollout.next_values, config.gamma,
                                  config.gae_lambda, rollout.terminated, rollout.truncated, rollout.valid,
                                  with_returns=True)
        observations, actions = rollout.flat("observations"), rollout.flat("actions")
        old_log_probs = rollout.flat("log_probs")
        keep = rollout.valid.reshape(-1).bool()
        flat_advantages, flat_returns = advantages.reshape(-1)[keep], returns.reshape(-1)[keep]
        if config.normalize_advantage:
            flat_advantages = normalize_advantages(flat_advantages)
        with torch.no_grad():
            old_params = policy(observations)
            old_log_std = None if space.discrete else policy.log_std.detach().clone()

        # 2. Gradient g of L^CPI and the Fisher matrix as the Hessian of the mean KL, both at theta_old
        #    (docs/math.md §3).
        params = policy(observations)
        surrogate = -cpi_loss(policy.log_prob(params, actions), old_log_probs, flat_advantages)
        gradient = flat_grad(surrogate, policy_parameters, retain_graph=True)
        mean_kl = policy.kl(old_params, params, old_log_std).mean()
        fisher = fisher_vector_product(mean_kl, policy_parameters, config.cg_damping)
        full_step, expected_improvement = natural_gradient_step(gradient, fisher, config.max_kl,
                                                                config.cg_iterations)

        # 3. Backtracking line search: accept only a step inside the trust region that improves L.
        old_vector = parameters_to_vector(policy_parameters).detach()
        old_surrogate = float(surrogate.detach())

        def evaluate(fraction: float) -> tuple[float, float]:
            vector_to_parameters(old_vector + fraction * full_step, policy_parameters)
            with torch.no_grad():
                new_params = policy(observations)
                new_surrogate = -cpi_loss(policy.log_prob(new_params, actions), old_log_probs, flat_advantages)
                kl = policy.kl(old_params, new_params, old_log_std).mean()
            return float(new_surrogate) - old_surrogate, float(kl)

        search = backtracking_line_search(evaluate, float(expected_improvement), config.max_kl,
                                          config.line_search_steps, config.line_search_shrink)
        vector_to_parameters(old_vector + search.fraction * full_step, policy_parameters)

        # 4. Critic regression on the lambda-returns, 1/2 (G - V)^2 (the critic of docs/math.md §2).
        samples = observations.shape[0]
        minibatch = max(1, samples // config.value_minibatches)
        for _ in range(config.value_epochs):
            order = torch.randperm(samples, generator=generator).to(session.device)
            for start in range(0, samples - minibatch + 1, minibatch):
                index = order[start:start + minibatch]
                critic_loss = value_loss(critic(observations[index]), flat_returns[index])
                if not session.finite(critic_loss):
                    continue
                critic_optimizer.zero_grad(set_to_none=True)
                critic_loss.backward()
                critic_optimizer.step()

        # 5. Log and checkpoint.
        recent = session.record_episodes(finished)
        with torch.no_grad():
            entropy = policy.entropy(policy(observations)).mean()
        elapsed = session.elapsed()
        last = session.metrics.log(step, elapsed, {
            "losses/surrogate_improvement": search.improvement, "policy/kl_old_new": search.kl,
            "losses/expected_improvement": float(expected_improvement), "losses/step_fraction": search.fraction,
            "losses/line_search_tries": search.tries, "losses/step_accepted": int(search.accepted),
            "losses/value": float(value_loss(critic(observations), flat_returns).detach()),
            "losses/entropy": float(entropy),
            "value/explained_variance": float(explained_variance(rollout.flat("values"), flat_returns)),
            "charts/sps": session.steps_per_second(step),
            "charts/skipped_updates": session.skipped_updates})
        session.show(step, recent, last["charts/sps"])
        if session.checkpoint_due(iteration + 1):
            session.save(iteration + 1, step)

    session.finish(step)
    env.close()
    return Run(Path(run_dir), "trpo", config, last, step)
