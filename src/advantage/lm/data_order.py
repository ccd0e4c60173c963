"""What each optimizer step learns from: the built-in task's files, the data's fingerprint, and the order of the
examples as a pure function of (seed, step), sharded over the processes."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from advantage.errors import UsageError
from advantage.lm.config import LMConfig
from advantage.run.seeding import derive_seed


def task_files(config: LMConfig, run_dir: Path) -> dict[str, Path]:
    """Write the built-in task's files into RUN_DIR/data (once; they depend only on the config) and return them."""
    from advantage.lm.tasks import ArithmeticTask

    task = ArithmeticTask(max_operand=config.task_max_operand, operations=config.task_operations,
                          max_second_operand=config.task_max_second_operand or None,
                          chat=config.task_format == "chat")
    directory = run_dir / "data"
    names = [f"{kind}_{split}" for kind in ("sft", "preference", "ranking") for split in ("train", "eval")]
    if all((directory / f"{name}.jsonl").is_file() for name in names):
        return {name: directory / f"{name}.jsonl" for name in names}
    return task.write_task_files(directory, config.task_train_size, config.task_eval_size, seed=config.seed)


def fingerprint(items: Sequence[Any]) -> str:
    """A short hash of the tokenized training data: a resumed run refuses data that changed under it."""
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()[:16]


class DataOrder:
    """Which examples each optimizer step learns from, as a pure function of (seed, step).

    Every epoch is a fresh permutation of the N examples drawn from a generator seeded with (seed, epoch); the
    concatenation of the epochs' permutations is cut into consecutive batches of `batch_size`, so batch k holds
    positions k * batch_size .. (k + 1) * batch_size - 1 of that stream (a batch may span two epochs). Nothing needs
    saving to resume: the step says where the stream is.

    This is also the one place the data is sharded: with `world_size` processes (`Processes`), rank r takes every
    world_size-th example of each batch, so the ranks together see exactly the single-process batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise UsageError("no training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._permutations = {epoch: torch.randperm(self.num_examples, generator=generator).tolist()}
        return self._permutations[epoch]

    def batch(self, step: int) -> list[int]:
        """Indices of the examples of optimizer step `step` (0-based) that this process handles."""
        indices = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_examples)
            indices.append(self._permutation(epoch)[offset])
        return indices[self.rank::self.world_size]

    def state(self, steps: int) -> dict[str, int]:
        """Where the stream is after `steps` steps (checkpointed for inspection; resuming recomputes it)."""
        epoch, offset = divmod(steps * self.batch_size, self.num_examples)
        return {"seed": self.seed, "num_examples": self.num_examples, "epoch": epoch, "offset": offset}

    def epochs_done(self, steps: int) -> float:
        """Passes over the data after `steps` optimizer steps."""
        return steps * self.batch_size / self.num_examples


def total_steps(config: LMConfig, num_examples: int) -> int:
    """`max_steps`, or enough steps for `epochs` passes over `num_examples` examples."""
    return config.max_steps or max(1, math.ceil(config.epochs * num_examples / config.batch_size))


def minibatch_order(count: int, epochs: int, num_minibatches: int, generator: torch.Generator) -> Iterator[list[int]]:
    """`epochs` passes over `count` items (a rollout's prompts), each a fresh permutation cut into
    `num_minibatches` equal minibatches: PPO's update order, one optimizer step per minibatch."""
    size = count // num_minibatches
    for _ in range(epochs):
        permutation = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, size):
            yield permutation[start:start + size]
