"""PPO (docs/math.md §3 and §7): collect with pi_old, estimate advantages by GAE, then several epochs of minibatch
steps on the clipped surrogate L^CLIP, or on the KL-penalised surrogate with the adaptive beta of the 1.5x rule.

Names: an *iteration* collects one *batch* of num_steps x num_envs transitions; the batch is split into
`num_minibatches` *minibatches*, each used once per *epoch*, for `update_epochs` epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from advantage.objectives.policy_gradient import (
    clipped_value_loss,
    explained_variance,
    normalize_advantages,
    value_loss,
)
from advantage.objectives.ppo import (
    SurrogateStats,
    adaptive_kl_beta,
    clipped_surrogate_loss,
    kl_penalty_surrogate_loss,
    surrogate_stats,
)
from advantage.objectives.returns import gae
from advantage.rl.common import RLConfig, Session, check_gamma, make_env, torch_generator, validate_common
from advantage.rl.flat_parameters import FlatParameters
from advantage.rl.networks import Policy, ValueFunction
from advantage.rl.rollout import Collector, FinishedEpisode
from advantage.run.config import param, require
from advantage.run.session import Run


@dataclass
class PPOConfig(RLConfig):
    """PPO's hyperparameters (defaults: CleanRL's ppo.py for CartPole; for Box actions, BOX_DEFAULTS)."""

    # Box (continuous) actions and no preset: the PPO paper's MuJoCo settings (benchmarks/configs/ppo_mujoco_paper.yaml
    # holds CleanRL's version of the whole set): one long rollout of 2,048 steps, minibatches of 64 for 10 epochs,
    # Adam at a constant 3e-4, no entropy bonus (a Gaussian's entropy term only widens it), observation and reward
    # normalisation (MuJoCo's observations and rewards span orders of magnitude). Constant, as in the paper's MuJoCo
    # table (it annealed only on Atari), not annealed to 0 as CleanRL does: a first run's total_steps is a guess, and
    # annealing ties the step size to it. Measured at 200k steps: Swimmer 58.2 constant against 42.9 annealed and
    # Reacher -6.5 against -8.1 (six seeds each); InvertedDoublePendulum 5,581 against 6,711 (three noisy seeds)
    # (benchmarks/README.md, "Defaults where no preset exists, second sitting").
    BOX_DEFAULTS: ClassVar[dict[str, object]] = {
        "num_envs": 1, "num_steps": 2048, "num_minibatches": 32, "update_epochs": 10, "learning_rate": 3e-4,
        "anneal_lr": False, "ent_coef": 0.0, "normalize_observation": True, "normalize_reward": True}

    # Old names that still work, with a notice: one vocabulary across the library (docs/math.md, "Names").
    RENAMED: ClassVar[dict[str, str]] = {"clip_coef": "clip_range", "value_clip_coef": "value_clip_range",
                                         "kl_beta": "beta"}

    variant: Literal["clip", "kl_penalty"] = param("clip", "clip: L^CLIP; kl_penalty: adaptive-beta KL penalty")
    learning_rate: float = param(2.5e-4, "Adam learning rate")
    anneal_lr: bool = param(True, "decay the learning rate linearly to 0 over the run")
    num_steps: int = param(128, "steps per environment per iteration (batch = num_steps x num_envs)")
    gamma: float = param(0.99, "discount gamma")
    gae_lambda: float = param(0.95, "GAE lambda")
    num_minibatches: int = param(4, "minibatches per epoch")
    update_epochs: int = param(4, "epochs over each batch")
    normalize_advantage: bool = param(True, "standardise advantages within each minibatch")
    clip_range: float = param(0.2, "epsilon of the clipped surrogate")
    anneal_clip: bool = param(False, "decay the clip range linearly to 0 over the run (SB3 zoo style)")
    clip_value_loss: bool = param(True, "clip the value update around the collection-time values")
    value_clip_range: float = param(0.2, "clip range of the value loss (if clipped)")
    ent_coef: float = param(0.01, "entropy bonus coefficient")
    vf_coef: float = param(0.5, "value-loss coefficient")
    max_grad_norm: float = param(0.5, "global gradient-norm clip (0 disables)")
    target_kl: float = param(0.0, "clip: stop the epochs early above this approx KL (0 disables); "
                                   "kl_penalty: the target KL of the 1.5x rule")
    beta: float = param(1.0, "kl_penalty: the KL coefficient beta (its initial value; adapted by the 1.5x rule)")
    initial_log_std: float = param(0.0, "initial log std of a Gaussian policy")


CONFIG = PPOConfig


def validate(config: PPOConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_common(config)
    check_gamma(config.gamma)
    check_gamma(config.gae_lambda, "gae_lambda")
    require(config.learning_rate > 0, "learning_rate", "must be > 0", config.learning_rate)
    require(config.num_steps > 0, "num_steps", "must be > 0", config.num_steps)
    require(config.num_minibatches > 0, "num_minibatches", "must be > 0", config.num_minibatches)
    require(config.num_steps * config.num_envs >= config.num_minibatches, "num_minibatches",
            "must not exceed the batch size num_steps x num_envs", config.num_minibatches)
    require(config.update_epochs > 0, "update_epochs", "must be > 0", config.update_epochs)
    require(config.clip_range >= 0, "clip_range", "must be >= 0", config.clip_range)
    require(config.value_clip_range >= 0, "value_clip_range", "must be >= 0", config.value_clip_range)
    require(config.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", config.max_grad_norm)
    require(config.target_kl >= 0, "target_kl", "must be >= 0", config.target_kl)
    require(config.variant != "kl_penalty" or config.target_kl > 0, "target_kl",
            "must be > 0 for variant kl_penalty (the 1.5x rule needs a target)", config.target_kl)
    require(config.beta >= 0, "beta", "must be >= 0", config.beta)


def train(config: PPOConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Train PPO on `config.env_id`, writing the run directory; returns the Run."""
    validate(config)
    torch.set_num_threads(config.threads)
    batch_size = config.num_steps * config.num_envs
    iterations = max(1, config.total_steps // batch_size)
    session = Session("ppo", config, run_dir, resume, iterations, batch_size, unit="rollout")

    env, space = make_env(config)
    torch.manual_seed(config.seed)
    policy = Policy(space, initial_log_std=config.initial_log_std, **config.networks())
    critic = ValueFunction(space.observation_dim, **config.networks()).to(session.device)
    policy.to(session.device)
    modules: dict[str, nn.Module] = {"policy": policy, "critic": critic}
    flat = FlatParameters([policy, critic])
    optimizer = torch.optim.Adam([flat.flat], lr=config.learning_rate, eps=1e-5, fused=True)
    generator = torch_generator(config.seed)
    beta = config.beta

    state = session.restore(modules, {"optimizer": optimizer}, generator, env)
    if state is not None:
        beta = float(state["beta"])
    collector = Collector(env, space, generator)
    step = session.start_step
    last: dict = {}
    finished: list[FinishedEpisode] = []

    for iteration in range(session.start_iteration, iterations):
        if session.segment_starts(iteration):
            collector.reset(session.environment_seed(iteration))
        progress_left = 1.0 - iteration / iterations
        lr = config.learning_rate * (progress_left if config.anneal_lr else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clip = config.clip_range * (progress_left if config.anneal_clip else 1.0)

        # 1. Collect a batch with pi_old (docs/math.md §3: trajectories sampled from the current policy).
        rollout = collector.collect(policy, critic, config.num_steps, step, finished)
        step += batch_size

        # 2. Advantages by GAE(gamma, lambda) and the lambda-returns the critic regresses on (docs/math.md §2).
        advantages, returns = gae(rollout.rewards, rollout.values, rollout.next_values, config.gamma,
                                  config.gae_lambda, rollout.terminated, rollout.truncated, rollout.valid,
                                  with_returns=True)
        observations, actions = rollout.flat("observations"), rollout.flat("actions")
        old_log_probs, old_values = rollout.flat("log_probs"), rollout.flat("values")
        flat_advantages = advantages.reshape(-1)[rollout.valid.reshape(-1).bool()]
        flat_returns = returns.reshape(-1)[rollout.valid.reshape(-1).bool()]
        if config.variant == "kl_penalty":
            with torch.no_grad():
                old_params = policy(observations)
                old_log_std = policy.log_std.detach().clone() if not space.discrete else None

        # 3. Several epochs of minibatch steps on the surrogate (importance ratio to pi_old, docs/math.md §3).
        samples = observations.shape[0]
        minibatch_size = max(1, samples // config.num_minibatches)
        losses: list[Tensor] = []  # per minibatch: policy loss, value loss, gradient norm (stacked, one sync)
        epoch_stats: list[SurrogateStats] = []
        stop_early = False
        # The log-probabilities and (normalised) advantages each minibatch step saw, so that the clip fraction
        # and approximate KL are computed once per epoch, on the whole batch, instead of once per minibatch.
        seen_log_probs = old_log_probs.clone()
        seen_advantages = flat_advantages.clone()
        for _epoch in range(config.update_epochs):
            order = torch.randperm(samples, generator=generator).to(session.device)
            used = order[:samples - samples % minibatch_size]
            for start in range(0, samples - minibatch_size + 1, minibatch_size):
                index = order[start:start + minibatch_size]
                params = policy(observations[index])
                log_probs = policy.log_prob(params, actions[index])
                minibatch_advantages = flat_advantages[index]
                if config.normalize_advantage and index.numel() > 1:
                    minibatch_advantages = normalize_advantages(minibatch_advantages)
                if config.variant == "clip":
                    policy_loss, _ = clipped_surrogate_loss(log_probs, old_log_probs[index], minibatch_advantages,
                                                            clip)
                else:
                    kl = policy.kl(old_params[index], params, old_log_std)
                    policy_loss = kl_penalty_surrogate_loss(log_probs, old_log_probs[index], minibatch_advantages,
                                                            kl, beta)
                values = critic(observations[index])
                if config.clip_value_loss:
                    critic_loss = clipped_value_loss(values, old_values[index], flat_returns[index],
                                                     config.value_clip_range)
                else:
                    critic_loss = value_loss(values, flat_returns[index])
                loss = policy_loss + config.vf_coef * critic_loss
                if config.ent_coef != 0:
                    loss = loss - config.ent_coef * policy.entropy(params).mean()
                if not session.finite(loss):
                    continue
                grad_norm = flat.descend(loss, optimizer, config.max_grad_norm)
                seen_log_probs[index] = log_probs.detach()
                seen_advantages[index] = minibatch_advantages
                losses.append(torch.stack([policy_loss.detach(), critic_loss.detach(), grad_norm]))
            stats = surrogate_stats(seen_log_probs[used], old_log_probs[used], seen_advantages[used], clip)
            epoch_stats.append(stats)
            if config.variant == "clip" and config.target_kl > 0 and float(stats.approx_kl) > config.target_kl:
                stop_early = True
                break

        # 4. PPO-penalty: adapt beta between iterations by the 1.5x rule (docs/math.md §3).
        with torch.no_grad():
            mean_kl = float(policy.kl(old_params, policy(observations), old_log_std).mean()) \
                if config.variant == "kl_penalty" else None
        if mean_kl is not None:
            beta = adaptive_kl_beta(beta, mean_kl, config.target_kl)

        # 5. Log and checkpoint.
        recent = session.record_episodes(finished)
        elapsed = session.elapsed()
        with torch.no_grad():
            entropy = float(policy.entropy(policy(observations)).mean())
        means = torch.stack(losses).mean(0).tolist() if losses else [None] * 3
        values_logged = {"losses/policy": means[0], "losses/value": means[1], "losses/entropy": entropy,
                         "policy/approx_kl": float(torch.stack([x.approx_kl for x in epoch_stats]).mean()),
                         "policy/clip_fraction": float(torch.stack([x.clip_fraction for x in epoch_stats]).mean()),
                         "losses/grad_norm": means[2]}
        values_logged.update({
            "value/explained_variance": float(explained_variance(old_values, flat_returns)),
            "charts/learning_rate": lr, "charts/sps": session.steps_per_second(step),
            "charts/early_stop": int(stop_early), "charts/skipped_updates": session.skipped_updates,
        })
        if mean_kl is not None:
            values_logged.update({"policy/kl_old_new": mean_kl, "kl/beta": beta})
        last = session.metrics.log(step, elapsed, values_logged)
        session.show(step, recent, values_logged["charts/sps"])
        if session.checkpoint_due(iteration + 1):
            session.save(iteration + 1, step, {"beta": beta})

    session.finish(step)
    env.close()
    return Run(Path(run_dir), "ppo", config, last, step)
