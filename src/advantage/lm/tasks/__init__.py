"""Built-in tasks with verifiable rewards, so the language-model pipeline runs offline on a CPU."""

from advantage.lm.tasks.arithmetic import ArithmeticTask

__all__ = ["ArithmeticTask"]
