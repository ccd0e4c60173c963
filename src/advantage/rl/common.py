"""What every classic algorithm shares: the base config, the run session (directory, metrics, checkpoints,
progress, exact resume) and the guard against non-finite losses.

Exact resume. A run is cut into segments of `checkpoint_every` iterations. At the start of every segment all
sub-environments are reset from a seed derived from the run seed and the iteration, and at its end a checkpoint is
written. A killed run restarts from its last checkpoint and replays exactly what the uninterrupted run did: the
environments' internal state (which Gymnasium cannot save in general) is never needed, because every segment
starts from a reset. The price is one forced episode boundary per segment (about ten per run); those cut episodes
bootstrap from the value like any truncation and are not counted in episodes.jsonl.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import torch

from advantage.errors import UsageError
from advantage.rl.envs import SpaceInfo, load_normalization_state, make_vector_env, normalization_state, space_info
from advantage.run.checkpoint import interval, load_checkpoint, save_checkpoint, save_weights
from advantage.run.config import describe_sources, param, require
from advantage.run.files import atomic_write_text
from advantage.run.report import threshold_summary
from advantage.run.seeding import derive_seed
from advantage.run.session import RunSession


@dataclass
class RLConfig:
    """Fields every classic algorithm has."""

    env_id: str = param("CartPole-v1", "Gymnasium environment id")
    total_steps: int = param(100_000, "environment steps to train for (summed over the parallel environments)")
    seed: int = param(1, "seed of the networks, the action sampling and the environments")
    num_envs: int = param(4, "parallel environments (Gymnasium vector API)")
    vectorization: Literal["auto", "sync", "async"] = param(
        "auto", "auto: the environment's own vectorised implementation if it has one, else sync")
    normalize_observation: bool = param(False, "running mean/std observation normalisation (MuJoCo-style tasks)")
    normalize_reward: bool = param(False, "scale rewards by the running std of the discounted return")
    hidden_sizes: str = param("64,64", "hidden layer sizes of the networks, comma separated")
    activation: Literal["tanh", "relu"] = param("tanh", "activation between the hidden layers")
    orthogonal_init: bool = param(True, "orthogonal weights, zero biases, small policy output layer; "
                                        "false: PyTorch's default initialisation")
    checkpoint_every: int = param(0, "iterations between checkpoints; 0 = about every 10% of the run")
    keep_checkpoints: int = param(2, "how many of the newest checkpoints to keep")
    max_nonfinite: int = param(5, "stop after this many consecutive updates with a non-finite loss")
    threads: int = param(1, "torch threads (1 is fastest for small networks)")
    device: str = param("auto", "where the networks are updated: auto (the CPU, see the README's GPU section), cpu, "
                                "cuda or cuda:N; rollouts are collected on the CPU either way")
    tensorboard: bool = param(True, "also write TensorBoard event files")
    progress: bool = param(True, "show progress (a live bar on a terminal, periodic lines otherwise)")
    label: str = param("", "the run's name in progress lines and reports (default: algorithm and environment)")

    def hidden(self) -> tuple[int, ...]:
        """`hidden_sizes` as a tuple of ints."""
        try:
            sizes = tuple(int(size) for size in str(self.hidden_sizes).split(",") if size.strip())
        except ValueError:
            raise UsageError(f"field 'hidden_sizes' must be comma-separated integers, got {self.hidden_sizes!r}") \
                from None
        if not sizes or min(sizes) < 1:
            raise UsageError(f"field 'hidden_sizes' must be positive integers, got {self.hidden_sizes!r}")
        return sizes

    def networks(self) -> dict[str, Any]:
        """Keyword arguments shared by the policy and the critic: hidden sizes, activation, initialisation."""
        return {"hidden": self.hidden(), "activation": self.activation, "orthogonal_init": self.orthogonal_init}


def validate_common(config: RLConfig) -> None:
    """Checks shared by every algorithm (each algorithm adds its own)."""
    require(config.total_steps > 0, "total_steps", "must be > 0", config.total_steps)
    require(config.num_envs > 0, "num_envs", "must be > 0", config.num_envs)
    require(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0", config.checkpoint_every)
    require(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", config.keep_checkpoints)
    require(config.max_nonfinite >= 1, "max_nonfinite", "must be >= 1", config.max_nonfinite)
    require(config.threads >= 1, "threads", "must be >= 1", config.threads)
    config.hidden()


def check_gamma(value: float, field: str = "gamma") -> None:
    """A discount or lambda must lie in [0, 1]."""
    require(0.0 <= value <= 1.0, field, "must be in [0, 1]", value)



class Session(RunSession):
    """The run directory of one classic training run, fresh or resumed (`run.session.RunSession`), with its
    environments cut into checkpoint segments.

    Args:
        algorithm: name written to config.yaml ("ppo", "a2c", ...).
        config: the resolved config dataclass.
        run_dir: where to write.
        resume: continue from the newest checkpoint in run_dir.
        iterations: total number of iterations of the run (for the default checkpoint interval).
        steps_per_iteration: environment steps per iteration.
        unit: what one iteration is ("rollout"); when given, a fresh run whose total_steps is less than one
            iteration says on stderr that it trains a whole one.
    """

    advice = "lower the learning rate, or enable observation/reward normalisation"
    # `--device auto` is the CPU for the classic algorithms: their networks are a few 64-wide layers updated in
    # minibatches of 64, where a GPU's kernel launches cost more than the arithmetic (README, "GPUs, several
    # processes or machines").
    auto_device = "cpu"

    def __init__(self, algorithm: str, config: RLConfig, run_dir: str | Path, resume: bool, iterations: int,
                 steps_per_iteration: int, unit: str = ""):
        super().__init__(algorithm, config, run_dir, resume)
        if self.processes.world_size > 1:
            raise UsageError("the classic algorithms train in one process; start them without torchrun")
        self.device = self.processes.device
        self.iterations = iterations
        self.steps_per_iteration = steps_per_iteration
        self.checkpoint_every = interval(config.checkpoint_every, iterations)
        self.start_iteration = 0
        self._start_note = ""
        if not resume and unit and config.total_steps < steps_per_iteration:  # more than asked for: say so
            self._start_note = (f"advantage: total_steps={config.total_steps} is less than one {unit} "
                                f"({steps_per_iteration} steps); training one {unit}, {steps_per_iteration} steps")

    def restore(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                generator: torch.Generator, env: gym.vector.VectorEnv) -> dict[str, Any] | None:
        """Register what a checkpoint holds and, when resuming, load the newest one into it; opens the writers.

        Args:
            modules: the networks (weights go to safetensors).
            optimizers: name -> optimizer, e.g. {"optimizer": adam}.
            generator: the sampling/shuffling generator.
            env: the vector environment whose normalisation statistics are saved.
        Returns:
            The saved state (for the algorithm's own extra entries), or None on a fresh start.
        """
        self._modules, self._optimizers, self._generator, self._env = modules, optimizers, generator, env
        # Written only now that the environment and the networks exist: a run that cannot start (an unknown
        # environment, an unsupported action space) leaves no run directory behind.
        self.write_config()
        if not self.resume:  # which defaults applied (those for the action space?), the preset, the file, the flags
            print(f"advantage: {describe_sources(self.algorithm, self.config)}", file=sys.stderr, flush=True)
        if self._start_note:
            print(self._start_note, file=sys.stderr)
        state = None
        if self.checkpoint_path is not None:
            state = load_checkpoint(self.checkpoint_path, modules)
            self.restore_common(state)
            self.start_iteration = int(state["iteration"])
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(state[name])
            generator.set_state(state["generator"])
            load_normalization_state(env, state["normalization"])
        description = self.config.label or f"{self.algorithm} {self.config.env_id}"
        self.open_writers(self.config.total_steps, description, episodes=True, resumed=self.resume)
        return state

    def segment_starts(self, iteration: int) -> bool:
        """True at the first iteration of a checkpoint segment, and at the first after a resume (every checkpoint
        ends a segment, also the final one that a resume with a larger budget continues from): the environments
        are reset there."""
        return iteration % self.checkpoint_every == 0 or iteration == self.start_iteration

    def environment_seed(self, iteration: int) -> int:
        """The reset seed of the segment starting at `iteration` (sub-environment i gets this + i)."""
        return derive_seed(self.config.seed, iteration)

    def checkpoint_due(self, iteration_done: int) -> bool:
        """True after the last iteration of a segment, and after the final iteration."""
        return iteration_done % self.checkpoint_every == 0 or iteration_done == self.iterations

    def save(self, iteration_done: int, step: int, extra: dict[str, Any] | None = None) -> None:
        """Flush the logs and checkpoint everything `restore` registered, plus the algorithm's `extra` entries."""
        assert self.metrics is not None
        self.metrics.flush()
        state = {**self.common_state(step), "iteration": iteration_done, "generator": self._generator.get_state(),
                 "normalization": normalization_state(self._env),
                 **{name: optimizer.state_dict() for name, optimizer in self._optimizers.items()}, **(extra or {})}
        save_checkpoint(self.run_dir, step, self._modules, state, keep=self.config.keep_checkpoints)

    def record_episodes(self, finished: list) -> list[float]:
        """Write the episodes finished since the last call to episodes.jsonl; empty the list; return their returns."""
        assert self.metrics is not None
        for episode in finished:
            self.metrics.episode(episode.step, self.elapsed(), episode.episode_return, episode.length)
        returns = [episode.episode_return for episode in finished]
        finished.clear()
        return returns

    def steps_per_second(self, step: int) -> float:
        """Environment steps per wall second since this process started training (resumed steps excluded)."""
        return (step - self.start_step) / max(self.elapsed() - self.elapsed_before, 1e-9)

    def show(self, step: int, recent_returns: list[float], sps: float) -> None:
        """Move the progress display to `step`, with the speed and the mean of the recent returns."""
        assert self.progress is not None
        figures = {"sps": sps}
        if recent_returns:
            figures["return"] = sum(recent_returns) / len(recent_returns)
        self.progress.update(min(step, self.config.total_steps), figures)

    def finish(self, step: int) -> None:
        """Write final/ (safetensors weights and normalization.json), close the writers, print where it went."""
        final = self.run_dir / "final"
        save_weights(final, self._modules, {"algorithm": self.algorithm, "env_id": self.config.env_id})
        atomic_write_text(final / "normalization.json", json.dumps(normalization_state(self._env)))
        self.close_writers(f"{self.algorithm} {self.config.env_id}: {step} steps in {self.elapsed():.1f} s "
                           f"-> {self.run_dir}")
        # Not a silent flat curve: whether the task's solved return was reached, and if not the best on the way.
        verdict = threshold_summary(self.run_dir, self.config.env_id)
        if verdict:
            print(f"{self.algorithm} {self.config.env_id}: {verdict}", file=sys.stderr, flush=True)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU generator for action sampling and minibatch shuffles (its state goes into checkpoints). It stays on
    the CPU whatever `--device` says, so the random stream, and a checkpoint, are the same on every device."""
    return torch.Generator().manual_seed(seed)


def make_env(config: Any) -> tuple[gym.vector.VectorEnv, SpaceInfo]:
    """The vector environment a config describes (all classic configs have the fields used) and its SpaceInfo."""
    env = make_vector_env(config.env_id, config.num_envs, config.vectorization, config.normalize_observation,
                          config.normalize_reward, config.gamma)
    return env, space_info(env, config.env_id)
