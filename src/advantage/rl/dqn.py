"""DQN (Q-learning, docs/math.md §3 and §7): an epsilon-greedy behaviour policy fills a replay buffer; the Q-network
regresses on Bellman targets r + gamma max_a' Q_target(s', a') computed with a periodically synchronised target
network (or the double-DQN target). Discrete actions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from advantage.errors import UsageError
from advantage.objectives.q_learning import linear_schedule, q_learning_targets, td_loss
from advantage.rl.common import RLConfig, Session, check_gamma, make_env, torch_generator, validate_common
from advantage.rl.flat_parameters import FlatParameters
from advantage.rl.networks import QNetwork
from advantage.rl.rollout import Collector, FinishedEpisode
from advantage.run.config import param, require
from advantage.run.session import Run


@dataclass
class DQNConfig(RLConfig):
    """DQN's hyperparameters (defaults: rl-baselines3-zoo's CartPole entry)."""

    num_envs: int = param(1, "parallel environments")
    hidden_sizes: str = param("256,256", "hidden layer sizes of the Q-network, comma separated")
    activation: Literal["tanh", "relu"] = param("relu", "activation between the hidden layers")
    orthogonal_init: bool = param(False, "orthogonal initialisation; false (PyTorch's default, as SB3) learned "
                                         "CartPole faster here (benchmarks/README.md)")
    learning_rate: float = param(2.3e-3, "Adam learning rate")
    buffer_size: int = param(100_000, "replay buffer capacity (transitions)")
    learning_starts: int = param(1_000, "environment steps before the first update")
    batch_size: int = param(64, "transitions per gradient step")
    gamma: float = param(0.99, "discount gamma")
    train_frequency: int = param(256, "environment steps between rounds of updates")
    gradient_steps: int = param(128, "gradient steps per round")
    target_update_interval: int = param(10, "environment steps between target-network synchronisations")
    tau: float = param(1.0, "target update rate: 1 copies, < 1 is Polyak averaging")
    exploration_fraction: float = param(0.16, "fraction of the run over which epsilon decays")
    start_epsilon: float = param(1.0, "initial epsilon")
    end_epsilon: float = param(0.04, "final epsilon")
    double_dqn: bool = param(True, "double-DQN targets (online argmax, target evaluation)")
    loss: Literal["huber", "mse"] = param("huber", "TD loss")
    max_grad_norm: float = param(10.0, "global gradient-norm clip (0 disables)")


CONFIG = DQNConfig


def validate(config: DQNConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_common(config)
    check_gamma(config.gamma)
    require(config.learning_rate > 0, "learning_rate", "must be > 0", config.learning_rate)
    require(config.buffer_size >= config.batch_size, "buffer_size", "must be >= batch_size", config.buffer_size)
    require(config.batch_size > 0, "batch_size", "must be > 0", config.batch_size)
    require(config.train_frequency > 0, "train_frequency", "must be > 0", config.train_frequency)
    require(config.gradient_steps >= 0, "gradient_steps", "must be >= 0", config.gradient_steps)
    require(config.target_update_interval > 0, "target_update_interval", "must be > 0", config.target_update_interval)
    require(0 < config.tau <= 1, "tau", "must be in (0, 1]", config.tau)
    require(0 <= config.exploration_fraction <= 1, "exploration_fraction", "must be in [0, 1]",
            config.exploration_fraction)
    for name in ("start_epsilon", "end_epsilon"):
        require(0 <= getattr(config, name) <= 1, name, "must be in [0, 1]", getattr(config, name))
    require(config.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", config.max_grad_norm)


class ReplayBuffer:
    """A ring buffer of transitions (s, a, r, s', terminated), stored as tensors so checkpoints can hold it."""

    def __init__(self, capacity: int, observation_dim: int):
        self.capacity = capacity
        self.observations = torch.zeros(capacity, observation_dim)
        self.next_observations = torch.zeros(capacity, observation_dim)
        self.actions = torch.zeros(capacity, dtype=torch.int64)
        self.rewards = torch.zeros(capacity)
        self.terminated = torch.zeros(capacity, dtype=torch.bool)
        self.position = 0
        self.size = 0

    def add(self, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_observations: np.ndarray,
            terminated: np.ndarray) -> None:
        """Append a batch of transitions (one per environment), overwriting the oldest when full."""
        for i in range(len(actions)):
            self.observations[self.position] = torch.from_numpy(observations[i])
            self.next_observations[self.position] = torch.from_numpy(next_observations[i])
            self.actions[self.position] = int(actions[i])
            self.rewards[self.position] = float(rewards[i])
            self.terminated[self.position] = bool(terminated[i])
            self.position = (self.position + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A uniform random minibatch (with replacement)."""
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        return (self.observations[index], self.actions[index], self.rewards[index], self.next_observations[index],
                self.terminated[index])

    def state(self) -> dict:
        """Everything needed to restore the buffer exactly (for checkpoints)."""
        return {"observations": self.observations[:self.size].clone(), "actions": self.actions[:self.size].clone(),
                "rewards": self.rewards[:self.size].clone(), "terminated": self.terminated[:self.size].clone(),
                "next_observations": self.next_observations[:self.size].clone(), "position": self.position}

    def load(self, state: dict) -> None:
        """Restore what `state` saved."""
        size = state["actions"].shape[0]
        self.observations[:size] = state["observations"]
        self.next_observations[:size] = state["next_observations"]
        self.actions[:size] = state["actions"]
        self.rewards[:size] = state["rewards"]
        self.terminated[:size] = state["terminated"]
        self.size, self.position = size, int(state["position"])


def train(config: DQNConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Train DQN on `config.env_id`, writing the run directory; returns the Run."""
    validate(config)
    torch.set_num_threads(config.threads)
    steps_per_iteration = config.train_frequency * config.num_envs
    iterations = max(1, config.total_steps // steps_per_iteration)
    session = Session("dqn", config, run_dir, resume, iterations, steps_per_iteration, unit="iteration")
    env, space = make_env(config)
    if not space.discrete:
        raise UsageError(f"dqn needs a Discrete action space; env '{config.env_id}' has Box actions")
    torch.manual_seed(config.seed)
    q_network = QNetwork(space.observation_dim, space.action_dim, **config.networks())
    target_network = QNetwork(space.observation_dim, space.action_dim, **config.networks())
    target_network.load_state_dict(q_network.state_dict())
    q_network.to(session.device)
    target_network.to(session.device)
    modules: dict[str, nn.Module] = {"q": q_network, "q_target": target_network}
    online_flat, target_flat = FlatParameters([q_network]), FlatParameters([target_network])
    optimizer = torch.optim.Adam([online_flat.flat], lr=config.learning_rate, fused=True)
    buffer = ReplayBuffer(config.buffer_size, space.observation_dim)
    generator = torch_generator(config.seed)
    gradient_updates = 0
    state = session.restore(modules, {"optimizer": optimizer}, generator, env)
    if state is not None:
        buffer.load(state["buffer"])
        gradient_updates = int(state["gradient_updates"])
    collector = Collector(env, space, generator)
    step = session.start_step
    finished: list[FinishedEpisode] = []
    last: dict = {}
    losses: list[float] = []
    q_means: list[float] = []
    exploration_steps = int(config.exploration_fraction * config.total_steps)
    log_every = max(1, 1000 // steps_per_iteration)
    recent: list[float] = []

    for iteration in range(session.start_iteration, iterations):
        if session.segment_starts(iteration):
            collector.reset(session.environment_seed(iteration))

        # 1. Act epsilon-greedily for train_frequency steps, storing every real transition (not reset steps).
        for _ in range(config.train_frequency):
            epsilon = linear_schedule(config.start_epsilon, config.end_epsilon, exploration_steps, step)
            observation = collector.observation
            with torch.inference_mode():
                greedy = q_network(torch.from_numpy(observation).to(session.device)).argmax(-1).cpu()
            explore = torch.rand(config.num_envs, generator=generator) < epsilon
            random_actions = torch.randint(0, space.action_dim, (config.num_envs,), generator=generator)
            actions = torch.where(explore, random_actions, greedy).numpy()
            step += config.num_envs
            next_observation, reward, terminated, _, valid = collector.step(actions, step, finished)
            if valid.any():  # under NEXT_STEP autoreset, next_observation is the true final one at episode ends
                keep = np.flatnonzero(valid)
                buffer.add(observation[keep], actions[keep], np.asarray(reward)[keep], next_observation[keep],
                           terminated[keep])
            # The target network follows the online one every target_update_interval environment steps, so it is
            # constant during a round of gradient steps (as in SB3 and CleanRL; syncing inside a round diverges).
            if step >= config.learning_starts and (step // config.num_envs) % config.target_update_interval == 0:
                with torch.no_grad():
                    target_flat.flat.lerp_(online_flat.flat, config.tau)

        # 2. Regress Q(s, a) on the Bellman targets (docs/math.md §3: Q = r + gamma V(s'), with V(s') = max Q).
        if step >= config.learning_starts and buffer.size >= config.batch_size:
            for _ in range(config.gradient_steps):
                # The buffer stays on the CPU (checkpoints hold it); each minibatch goes to the networks' device.
                observations, actions, rewards, next_observations, terminated = (
                    sampled.to(session.device) for sampled in buffer.sample(config.batch_size, generator))
                with torch.no_grad():
                    next_q_target = target_network(next_observations)
                    next_q_online = q_network(next_observations) if config.double_dqn else None
                targets = q_learning_targets(rewards, next_q_target, terminated, config.gamma, next_q_online)
                q_taken = q_network(observations).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
                loss = td_loss(q_taken, targets, config.loss)
                if not session.finite(loss):
                    continue
                online_flat.descend(loss, optimizer, config.max_grad_norm)
                gradient_updates += 1
                losses.append(float(loss.detach()))
                q_means.append(float(q_taken.detach().mean()))

        # 3. Log (about every 1,000 environment steps: an iteration is only train_frequency steps) and checkpoint.
        recent += session.record_episodes(finished)
        if (iteration + 1) % log_every and not session.checkpoint_due(iteration + 1) and iteration + 1 < iterations:
            continue
        elapsed = session.elapsed()
        last = session.metrics.log(step, elapsed, {
            "losses/td": sum(losses) / len(losses) if losses else None,
            "losses/q_values": sum(q_means) / len(q_means) if q_means else None,
            "charts/epsilon": linear_schedule(config.start_epsilon, config.end_epsilon, exploration_steps, step),
            "charts/gradient_updates": gradient_updates,
            "charts/sps": session.steps_per_second(step),
            "charts/skipped_updates": session.skipped_updates})
        losses.clear()
        q_means.clear()
        session.show(step, recent, last["charts/sps"])
        recent = []
        if session.checkpoint_due(iteration + 1):
            session.save(iteration + 1, step, {"buffer": buffer.state(), "gradient_updates": gradient_updates})

    session.finish(step)
    env.close()
    return Run(Path(run_dir), "dqn", config, last, step)
