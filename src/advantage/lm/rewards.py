"""Rewards of online RL on language models: Python functions named `module:function`, or a reward model.

A reward function takes the prompts and the completions (lists of strings of equal length) and returns one float
per completion, as the built-in task's `advantage.lm.tasks.arithmetic:reward` does (the signature TRL's GRPO users
already write; extra keyword arguments are not passed). Several functions combine as a weighted sum

    r(x, y) = sum_j w_j f_j(x, y).

The episode of seed 003's token MDP ends with the completion, and this is its return: the reward arrives at the last
token only. A function that raises, or returns None, NaN, a non-number or the wrong count, stops the run with a
message naming it: a silent 0 would teach the policy something nobody asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from advantage.errors import UsageError

RewardCallable = Callable[[list[str], list[str]], Sequence[float]]


class RewardFunctionError(UsageError):
    """A reward function failed or returned something that is not one finite float per completion."""


@dataclass
class RewardFunction:
    """One named reward function and its weight in the sum."""

    name: str
    function: RewardCallable
    weight: float = 1.0

    def __call__(self, prompts: list[str], completions: list[str]) -> Tensor:
        """The function's rewards, checked: (N,) float32 for N completions.

        Raises:
            RewardFunctionError naming the function if it raises or returns anything but N finite numbers.
        """
        try:
            values = self.function(prompts, completions)
        except Exception as error:  # the user's code: report which function, never a traceback from our side
            raise RewardFunctionError(f"reward function '{self.name}' raised {type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''}") from error
        if values is None:
            raise RewardFunctionError(f"reward function '{self.name}' returned None; it must return one float per "
                                      f"completion")
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(f"reward function '{self.name}' returned {type(values).__name__}, not a "
                                      f"list of floats") from None
        if len(values) != len(completions):
            raise RewardFunctionError(f"reward function '{self.name}' returned {len(values)} values for "
                                      f"{len(completions)} completions")
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardFunctionError(f"reward function '{self.name}' returned {value!r} for completion "
                                          f"{index}; every reward must be a finite number")
        return torch.tensor(values, dtype=torch.float32)


def load_reward_function(spec: str) -> RewardCallable:
    """The callable named `module:function` (an importable module) or `path/to/file.py:function`.

    Raises:
        UsageError naming the spec if the module or the function cannot be found.
    """
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise UsageError(f"field 'reward_functions': '{spec}' is not of the form module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"field 'reward_functions': no file '{module_name}'")
            module_spec = importlib.util.spec_from_file_location(f"advantage_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"field 'reward_functions': cannot import '{module_name}' ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"field 'reward_functions': '{module_name}' has no function '{function_name}'")
    return function


def reward_functions(specs: str, weights: str = "") -> list[RewardFunction]:
    """The comma-separated `module:function` specs with their comma-separated weights (default 1 each)."""
    names = [spec.strip() for spec in specs.split(",") if spec.strip()]
    if not names:
        raise UsageError("field 'reward_functions' is empty; name at least one module:function")
    values = [1.0] * len(names)
    if weights.strip():
        try:
            values = [float(weight) for weight in weights.split(",")]
        except ValueError:
            raise UsageError(f"field 'reward_weights' must be comma-separated numbers, got {weights!r}") from None
        if len(values) != len(names):
            raise UsageError(f"field 'reward_weights' has {len(values)} weights for {len(names)} reward functions")
    return [RewardFunction(name, load_reward_function(name), weight) for name, weight in zip(names, values)]


def combined_rewards(functions: Sequence[RewardFunction], prompts: list[str],
                     completions: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """r = sum_j w_j f_j over the functions, and each function's own rewards (for the logs).

    Returns:
        ((N,) float32 weighted sum, {name: (N,) rewards of that function}).
    """
    each = {function.name: function(prompts, completions) for function in functions}
    total = sum(function.weight * each[function.name] for function in functions)
    return total, each
