"""Arithmetic with a verifiable reward: prompts like "23+58=", answer "81". The whole LM pipeline runs on it offline.

Conventions (chosen so that the files make sense to a reader and to any trainer):
- Completions end with a newline ("81\\n"). The end of the answer is then in the data itself, whatever a trainer
  does about EOS, and a model trained on it learns to stop; a trainer may still append EOS after it.
- The reward skips leading whitespace (newlines too), reads up to the next newline, and keeps the leading run of
  number characters (digits, '-', '.', ','): 1.0 if that equals the answer exactly, else 0.0. So " 81\\n" and
  "81abc" score 1.0 (text after the number is not judged: the number is the answer), while "8", "", "081",
  "81.5" and "+81" score 0.0 (a different number, or no number, is a wrong answer).
- Subtraction may give negative answers ("3-7=" -> "-4").
- The reward parses the question from the prompt itself (its last "a op b =" ), so it works on prompts wrapped
  in a chat template, and `module:function` users can point at `advantage.lm.tasks.arithmetic:reward`.
- Everything random comes from the seed: the same seed gives the same files; the wrong answers of a row depend
  only on the seed and the prompt.

The chat format (`chat=True`, for a real instruct model with a chat template) asks the same questions as a user
would, "What is 23 + 58? Answer with the number only.", in conversational rows (a list of messages), with the answer
in a column of its own (`answer`, as verifiable-reward data sets have it); the reply of the demonstrations is the
number, "81". Its verifier is `answer_is_last_number`: a reply is right when the last number in it is the answer, so
"81", "23 + 58 = 81" and "The answer is 81." are right, "23 + 58 = 80" and an answer cut off before its number are
not. (SmolLM2-135M-Instruct answers 29% of held-out questions with operands up to 50 right this way, greedily within
16 tokens; without the instruction to answer with the number only, most of its answers run past that budget.)
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from advantage.errors import UsageError
from advantage.lm.data import write_jsonl

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_QUESTION = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=")
_NUMBER_PREFIX = re.compile(r"[0-9.,\-]*")


def answer(prompt: str) -> str:
    """The right answer to the last "a op b =" in the prompt, as text ("23+58=" -> "81")."""
    questions = _QUESTION.findall(prompt)
    if not questions:
        raise UsageError(f"arithmetic reward: no question like '23+58=' in prompt {prompt[-80:]!r}")
    left, operation, right = questions[-1]
    return str(OPERATIONS[operation](int(left), int(right)))


def reward(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
    """1.0 for each completion whose leading number (after leading whitespace) equals the answer, else 0.0.

    This is also the signature of user reward functions given as `module:function` (`lm.rewards`): prompts and
    completions are strings, or conversations (the question is then read from the prompt's last user message, the
    answer from the completion's content); other keyword arguments (the data's other columns) are not needed.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [1.0 if _leading_number(_text(completion)) == answer(_text(prompt)) else 0.0
            for prompt, completion in zip(prompts, completions)]


_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def answer_is_last_number(prompts: Sequence, completions: Sequence, answer: Sequence[str], **columns) -> list[float]:
    """1.0 for each completion whose last number equals the `answer` column, else 0.0 (the chat format's verifier).

    A reward function as TRL users write one: prompts and completions are strings or conversations, the ground truth
    comes from the data's `answer` column. Thousands separators are ignored ("1,234" is 1234).
    """
    if not len(prompts) == len(completions) == len(answer):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(answer)} answers")
    rewards = []
    for completion, truth in zip(completions, answer):
        numbers = _LAST_NUMBER.findall(_text(completion))
        rewards.append(1.0 if numbers and numbers[-1].replace(",", "") == str(truth).strip() else 0.0)
    return rewards


def _text(value) -> str:
    """A string as it is; a conversation as its last message's content (the question, or the reply)."""
    return value if isinstance(value, str) else str(value[-1]["content"])


def _leading_number(completion: str) -> str:
    first_line = completion.strip().split("\n", 1)[0].strip()
    return _NUMBER_PREFIX.match(first_line).group()


@dataclass(frozen=True)
class ArithmeticTask:
    """Questions "a op b =" with a in 0..max_operand, b in 0..max_second_operand (default: max_operand too) and op
    drawn from `operations` (a string of + - *).

    A small second operand ("73+8=") keeps the skill small (copy the tens, add two digits, carry) while the
    questions are many (100 x 10): a model can then be judged on hundreds of questions it never saw.
    """

    max_operand: int = 99
    operations: str = "+"
    chat: bool = False
    max_second_operand: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_operand, bool) or not isinstance(self.max_operand, int) or self.max_operand < 1:
            raise UsageError(f"arithmetic task: max_operand must be an integer >= 1, got {self.max_operand!r}")
        second = self.max_second_operand
        if second is not None and (isinstance(second, bool) or not isinstance(second, int) or second < 1):
            raise UsageError(f"arithmetic task: max_second_operand must be an integer >= 1, got {second!r}")
        unknown = set(self.operations) - set(OPERATIONS)
        if not self.operations or unknown or len(set(self.operations)) != len(self.operations):
            raise UsageError(f"arithmetic task: operations must be distinct characters from "
                             f"{''.join(OPERATIONS)}, got {self.operations!r}")

    @property
    def n_questions(self) -> int:
        """How many distinct prompts exist."""
        return len(self.operations) * (self.max_operand + 1) * (self._second_max + 1)

    @property
    def _second_max(self) -> int:
        return self.max_operand if self.max_second_operand is None else self.max_second_operand

    def prompts(self, n: int, seed: int) -> list[str]:
        """n distinct prompts, drawn without replacement; the same seed gives the same list."""
        if n < 0:
            raise UsageError(f"arithmetic task: the number of prompts must be >= 0, got {n}")
        if n > self.n_questions:
            raise UsageError(f"arithmetic task: asked for {n} distinct prompts, but max_operand={self.max_operand} "
                             f"and operations {self.operations!r} give only {self.n_questions}")
        pairs = (self.max_operand + 1) * (self._second_max + 1)
        result = []
        for index in random.Random(seed).sample(range(self.n_questions), n):
            operation, pair = divmod(index, pairs)
            left, right = divmod(pair, self._second_max + 1)
            result.append(f"{left}{self.operations[operation]}{right}=")
        return result

    def answer(self, prompt: str) -> str:
        """The right answer to a prompt, as text."""
        return answer(prompt)

    def reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """1.0 per right completion, else 0.0 (see the module docstring for exactly what counts)."""
        return reward(prompts, completions)

    def sft_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """n rows {"prompt": "23+58=", "completion": "81\\n"}."""
        return [self._sft_row(prompt) for prompt in self.prompts(n, seed)]

    def preference_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """n rows {"prompt", "chosen" (right), "rejected" (a plausible wrong answer)}: Bradley-Terry pairs
        (docs/math.md §5)."""
        return [self._preference_row(prompt, seed) for prompt in self.prompts(n, seed)]

    def preference_rows_for(self, prompts: Sequence[str], pairs_per_prompt: int) -> list[dict[str, str]]:
        """`pairs_per_prompt` Bradley-Terry rows for each of `prompts` (the right answer against wrong answers drawn
        with seeds 0, 1, ...; two draws may give the same wrong answer). More pairs per prompt than the task files'
        one give a reward model or DPO enough comparisons to learn from a few dozen prompts."""
        return [self._preference_row(prompt, seed) for seed in range(pairs_per_prompt) for prompt in prompts]

    def ranking_rows(self, n: int, k: int, seed: int) -> list[dict[str, object]]:
        """n rows {"prompt", "responses": k distinct answers, best first}: the right answer, then wrong ones by
        increasing absolute error. For K-wise comparisons and Plackett-Luce (docs/math.md §5)."""
        return [self._ranking_row(prompt, k, seed) for prompt in self.prompts(n, seed)]

    def write_task_files(self, directory: str | os.PathLike, n_train: int = 1000, n_eval: int = 100,
                         seed: int = 0, ranking_k: int = 4) -> dict[str, Path]:
        """Write sft, preference and ranking train/eval JSONL files; return {"sft_train": path, ...}.

        Train and eval prompts are disjoint (drawn together without replacement, then split); every kind uses the
        same train prompts and the same eval prompts.
        """
        if n_train < 1 or n_eval < 1:
            raise UsageError(f"arithmetic task: n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
        drawn = self.prompts(n_train + n_eval, seed)
        splits = {"train": drawn[:n_train], "eval": drawn[n_train:]}
        directory = Path(directory)
        paths = {}
        for split, split_prompts in splits.items():
            contents = {
                "sft": [self._sft_row(prompt) for prompt in split_prompts],
                "preference": [self._preference_row(prompt, seed) for prompt in split_prompts],
                "ranking": [self._ranking_row(prompt, ranking_k, seed) for prompt in split_prompts],
            }
            for kind, rows in contents.items():
                path = directory / f"{kind}_{split}.jsonl"
                write_jsonl(rows, path)
                paths[f"{kind}_{split}"] = path
        return paths


    # The rows of each kind, in the task's format: text ("23+58=" -> "81\n") or chat (a user question, a reply).

    def _sft_row(self, prompt: str) -> dict:
        row = _sft_row(prompt)
        if not self.chat:
            return row
        return {"prompt": _question(prompt), "completion": _reply(answer(prompt)), "answer": answer(prompt)}

    def _preference_row(self, prompt: str, seed: int) -> dict:
        row = _preference_row(prompt, seed)
        if not self.chat:
            return row
        return {"prompt": _question(prompt), "chosen": _reply(row["chosen"].strip()),
                "rejected": _reply(row["rejected"].strip()), "answer": answer(prompt)}

    def _ranking_row(self, prompt: str, k: int, seed: int) -> dict:
        row = _ranking_row(prompt, k, seed)
        if not self.chat:
            return row
        return {"prompt": _question(prompt), "responses": [value.strip() for value in row["responses"]],
                "answer": answer(prompt)}


def _spaced(prompt: str) -> str:
    """ "23+58=" -> "23 + 58" """
    left, operation, right = _QUESTION.findall(prompt)[-1]
    return f"{left} {operation} {right}"


CHAT_INSTRUCTION = "Answer with the number only."


def _question(prompt: str) -> list[dict[str, str]]:
    """The chat format's prompt: one user message asking the question, "What is 23 + 58? Answer with the number
    only." """
    return [{"role": "user", "content": f"What is {_spaced(prompt)}? {CHAT_INSTRUCTION}"}]


def _reply(value: str) -> list[dict[str, str]]:
    """The chat format's reply: the number."""
    return [{"role": "assistant", "content": value}]


def _sft_row(prompt: str) -> dict[str, str]:
    return {"prompt": prompt, "completion": answer(prompt) + "\n"}


def _preference_row(prompt: str, seed: int) -> dict[str, str]:
    right = int(answer(prompt))
    wrong = _plausible_wrong_answer(right, _row_random(seed, prompt))
    return {"prompt": prompt, "chosen": f"{right}\n", "rejected": f"{wrong}\n"}


def _ranking_row(prompt: str, k: int, seed: int) -> dict[str, object]:
    if k < 2:
        raise UsageError(f"arithmetic task: a ranking needs k >= 2 responses, got {k}")
    right = int(answer(prompt))
    rng = _row_random(seed, prompt)
    # Distinct error sizes give distinct answers and a strict order: no ties for Plackett-Luce to break.
    error_sizes = sorted(rng.sample(range(1, max(20, 2 * k) + 1), k - 1))
    wrong = [_offset(right, size, rng) for size in error_sizes]
    return {"prompt": prompt, "responses": [f"{value}\n" for value in [right, *wrong]]}


def _row_random(seed: int, prompt: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and Python processes.
    return random.Random(f"{seed}/{prompt}")


def _offset(right: int, size: int, rng: random.Random) -> int:
    """right +- size; never negative when the right answer is not, since a negative sum is not a plausible slip."""
    if rng.random() < 0.5 and (right < 0 or right - size >= 0):
        return right - size
    return right + size


def _plausible_wrong_answer(right: int, rng: random.Random) -> int:
    """A slip a learner makes: off by a little or by a carry (1, 2, 3, 10), or one digit changed."""
    if rng.random() < 0.5:
        return _offset(right, rng.choice((1, 2, 3, 10)), rng)
    digits = list(str(abs(right)))
    position = rng.randrange(len(digits))
    # No leading zero in a number of several digits: "081" is not how anyone writes 81.
    lowest = 1 if position == 0 and len(digits) > 1 else 0
    digits[position] = rng.choice([d for d in "0123456789"[lowest:] if d != digits[position]])
    return int("".join(digits)) * (-1 if right < 0 else 1)
