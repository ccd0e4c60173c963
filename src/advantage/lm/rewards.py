"""Rewards of online RL on language models: Python functions named `module:function`, or a reward model.

A reward function is written as TRL's GRPO users write theirs: it takes the prompts and the completions (lists of
equal length N, one entry per completion, the prompt repeated for each of its samples) and returns one number per
completion. The data set's other columns reach it as keyword arguments, one list of N values each, so that a
verifiable reward reads its ground truth from a column:

    def correct(prompts, completions, answer, **kwargs):
        return [1.0 if completion.strip() == truth else 0.0 for completion, truth in zip(completions, answer)]

Besides the columns it may ask for `completion_ids` (the sampled token ids, end token included). A function gets
the keyword arguments it names, and every one if it takes **kwargs; `f(prompts, completions)` works as it is.
Prompts and completions are strings for plain-text data; for a conversational prompt column (lists of messages)
the prompt is the list of messages and the completion the assistant's reply as a list of one message
[{"role": "assistant", "content": text}], as TRL passes them. The numbers may be Python, numpy or torch scalars
(or a numpy array / torch tensor of N values).

Several functions combine as a weighted sum

    r(x, y) = sum_j w_j f_j(x, y).

The episode of the token MDP (docs/math.md §5) ends with the completion, and this is its return: the reward arrives at
the last token only. A function that raises, or returns None, NaN, a non-number or the wrong count, stops the run with a
message naming it: a silent 0 would teach the policy something nobody asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from advantage.errors import UsageError

RewardCallable = Callable[..., Sequence[float]]


class RewardFunctionError(UsageError):
    """A reward function failed or returned something that is not one finite float per completion."""


def _as_number(value: Any) -> float | None:
    """`value` as a float if it is one real number (Python, numpy or a one-element torch tensor), else None."""
    if isinstance(value, numbers.Real):  # int, float, bool, numpy's integer and floating scalars
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d torch tensor or numpy array
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def _keyword_arguments(function: Callable) -> set[str] | None:
    """The keyword arguments `function` accepts besides the first two, or None if it takes **kwargs (all)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: give it the two positional arguments only
        return set()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    named = [parameter for parameter in parameters
             if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return {parameter.name for parameter in named[2:]} | \
        {parameter.name for parameter in named if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass
class RewardFunction:
    """One named reward function and its weight in the sum."""

    name: str
    function: RewardCallable
    weight: float = 1.0
    accepted: set[str] | None = field(init=False)

    def __post_init__(self) -> None:
        self.accepted = _keyword_arguments(self.function)

    def __call__(self, prompts: list, completions: list, **columns: list) -> Tensor:
        """The function's rewards, checked: (N,) float32 for N completions.

        Args:
            prompts, completions: N each (strings, or conversations; see the module docstring).
            columns: the data set's other columns and `completion_ids`, N values each; the function receives those
                it names (all of them if it takes **kwargs).

        Raises:
            RewardFunctionError naming the function if it raises or returns anything but N finite numbers.
        """
        given = columns if self.accepted is None else \
            {name: values for name, values in columns.items() if name in self.accepted}
        try:
            values = self.function(prompts, completions, **given)
        except Exception as error:  # the user's code: report which function, never a traceback from our side
            raise RewardFunctionError(f"reward function '{self.name}' raised {type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''}") from error
        if values is None:
            raise RewardFunctionError(f"reward function '{self.name}' returned None; it must return one float per "
                                      f"completion")
        if getattr(values, "ndim", None) == 0 or isinstance(values, (str, bytes, numbers.Number)):
            raise RewardFunctionError(f"reward function '{self.name}' returned {type(values).__name__}, not a "
                                      f"list of floats")
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(f"reward function '{self.name}' returned {type(values).__name__}, not a "
                                      f"list of floats") from None
        if len(values) != len(completions):
            raise RewardFunctionError(f"reward function '{self.name}' returned {len(values)} values for "
                                      f"{len(completions)} completions")
        numbers_ = []
        for index, value in enumerate(values):
            number = _as_number(value)
            if number is None or not math.isfinite(number):
                shown = number if number is not None else value
                raise RewardFunctionError(f"reward function '{self.name}' returned {shown!r} for completion "
                                          f"{index}; every reward must be a finite number")
            numbers_.append(number)
        return torch.tensor(numbers_, dtype=torch.float32)


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
    except UsageError:
        raise
    except SyntaxError as error:  # the user's file: name the line, never a traceback from our side
        raise UsageError(f"{error.filename or module_name}:{error.lineno}: syntax error in the reward module "
                         f"({error.msg})") from None
    except Exception as error:  # raised while the user's module ran its top level
        raise UsageError(f"field 'reward_functions': importing '{module_name}' raised {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
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


def combined_rewards(functions: Sequence[RewardFunction], prompts: list, completions: list,
                     **columns: list) -> tuple[Tensor, dict[str, Tensor]]:
    """r = sum_j w_j f_j over the functions, and each function's own rewards (for the logs).

    Args:
        columns: keyword arguments for the functions (`RewardFunction.__call__`).
    Returns:
        ((N,) float32 weighted sum, {name: (N,) rewards of that function}).
    """
    each = {function.name: function(prompts, completions, **columns) for function in functions}
    total = sum(function.weight * each[function.name] for function in functions)
    return total, each
