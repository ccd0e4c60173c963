"""Preference data: rankings of answers to the same prompt, tokenized and batched (shared by reward and dpo).

A preference pair (prompt, chosen, rejected) is the ranking (chosen, rejected): K = 2 answers, best first. Rows come
from data.py's preference or ranking formats, or from the files of a built-in task.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from advantage.lm.config import LMConfig, validate_lm
from advantage.lm.data import Row, load_rows, preference_triples, rankings
from advantage.lm.data_order import fingerprint, task_files
from advantage.lm.examples import keep_trainable, tokenize_pairs
from advantage.lm.logprobs import SharedPromptBatch, collate_shared_prompt
from advantage.run.config import param, require


@dataclass
class PreferenceDataConfig(LMConfig):
    """The fields of every stage that learns from preferences (reward, dpo): which columns, which answers."""

    data_kind: Literal["auto", "preference", "ranking"] = param(
        "auto", "columns of the data: preference (prompt, chosen, rejected) or ranking (prompt, responses best "
                "first); auto: ranking for the listwise losses, preference otherwise")
    ranking_answers: Literal["all", "best_worst"] = param(
        "all", "ranking data: train on every answer of each ranking, or only on its best and worst (one pair per "
               "prompt); held-out metrics always use every pair")


# The losses that read whole rankings (reward's kwise and plackett_luce, dpo's plackett_luce); the others read pairs.
LISTWISE = ("kwise", "plackett_luce")


def data_kind(config: PreferenceDataConfig, listwise: bool) -> str:
    """"preference" or "ranking": `config.data_kind`, or for auto the kind the loss reads (ranking if `listwise`)."""
    if config.data_kind != "auto":
        return config.data_kind
    return "ranking" if listwise else "preference"


def validate_preference_data(config: PreferenceDataConfig, loss: str, listwise: bool) -> None:
    """Checks shared by reward and dpo: a pairwise `loss` needs preference data; best_worst needs rankings."""
    validate_lm(config)
    kind = data_kind(config, listwise)
    require(listwise or kind == "preference", "loss", "compares pairs and needs preference data; for rankings use "
            "a listwise loss (with --ranking-answers best_worst for the best-vs-worst pair)", loss)
    require(config.ranking_answers == "all" or kind == "ranking", "ranking_answers",
            "best_worst needs ranking data (data_kind ranking)", config.ranking_answers)



# ---------------------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class RankedExample:
    """One tokenized prompt and its K >= 2 answers, best first (a preference pair: chosen, rejected).

    Attributes:
        prompt_ids: the prompt's token ids (the initial state, docs/math.md §5).
        completion_ids: K token-id lists, each ending with one end token.
    """

    prompt_ids: list[int]
    completion_ids: list[list[int]]


def preference_data_paths(config: PreferenceDataConfig, run_dir: Path, kind: str) -> tuple[str, str]:
    """(training, held-out) data paths: the task's files of `kind`, or --data and --eval-data."""
    if config.task != "none":
        files = task_files(config, run_dir)
        return str(files[f"{kind}_train"]), str(files[f"{kind}_eval"])
    return config.data, config.eval_data


def load_preference_rows(config: PreferenceDataConfig, run_dir: Path, kind: str) -> tuple[list[Row], list[Row]]:
    """Training and held-out rows of `kind`, checked (a malformed row stops the run here, before the model loads)."""
    train_path, eval_path = preference_data_paths(config, run_dir, kind)
    return load_rows(train_path, kind), (load_rows(eval_path, kind) if eval_path else [])


def tokenize_rankings(rows: Sequence[Row], kind: str, tokenizer, length: int, what: str,
                      end_ids: Sequence[int] | None = None) -> list[RankedExample]:
    """Token ids of every row's prompt and answers (each ending with one end token, `examples.tokenize_pairs`; each
    prompt + answer cut to `length` tokens).

    A preference row becomes the ranking (chosen, rejected). Cuts are reported on stderr, as in sft; rows left with
    nothing to compare (an answer cut to no token, or all cut to the same tokens) are left out
    (`examples.keep_trainable`).
    """
    texts = [(prompt, [chosen, rejected]) for prompt, chosen, rejected in preference_triples(rows, tokenizer)] \
        if kind == "preference" else rankings(rows, tokenizer)
    examples, cut, trainable = [], 0, []
    for prompt, answers in texts:
        pairs, count = tokenize_pairs([(prompt, answer) for answer in answers], tokenizer, length, end_ids)
        cut += count
        examples.append(RankedExample(pairs[0].prompt_ids, [pair.completion_ids for pair in pairs]))
        # An answer cut to nothing, or answers cut to the same tokens, leave no difference to learn a preference from.
        answers_ids = [tuple(pair.completion_ids) for pair in pairs]
        trainable.append(all(answers_ids) and not (count and len(set(answers_ids)) == 1))
    keep = keep_trainable(trainable, [row.where for row in rows], length, what, "rows")
    if cut:
        print(f"advantage: {cut} {what} answers are longer than max_length={length} tokens (with the prompt) and "
              f"were cut at the right", file=sys.stderr)
    return [examples[index] for index in keep]


def best_and_worst(examples: Sequence[RankedExample]) -> list[RankedExample]:
    """Each ranking reduced to its first and last answer: the single most certain comparison it holds."""
    return [RankedExample(e.prompt_ids, [e.completion_ids[0], e.completion_ids[-1]]) for e in examples]


def data_fingerprint(examples: Sequence[RankedExample]) -> str:
    """`data_order.fingerprint` of the tokenized rankings (a resumed run refuses changed data)."""
    return fingerprint([[e.prompt_ids, e.completion_ids] for e in examples])


# ----------------------------------------------------------------------------------------------------------- batches


@dataclass
class RankingBatch:
    """B rankings as one batch: each prompt once, its K answers beside it (`logprobs.SharedPromptBatch`).

    Attributes:
        answers: B prompts and B x K answers; answer row b * K + k is answer k of ranking b (empty where ranking b
            has fewer than K).
        mask: (B, K) bool; True where ranking b has an answer k.
    """

    answers: SharedPromptBatch
    mask: Tensor

    @property
    def real_tokens(self) -> int:
        """Tokens the model runs on: each prompt once, every answer (padding excluded)."""
        return self.answers.real_tokens

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the batch by name (the inputs of a graphed pass, `cuda_graphs.GraphedPasses`)."""
        return {"mask": self.mask, **{f"answers.{name}": value for name, value in self.answers.tensors().items()}}

    def with_tensors(self, tensors: dict[str, Tensor]) -> RankingBatch:
        """This batch with the tensors of `tensors()`'s names replaced by those given."""
        answers = {name.removeprefix("answers."): value for name, value in tensors.items()
                   if name.startswith("answers.")}
        return RankingBatch(self.answers.with_tensors(answers), tensors["mask"])


def collate_rankings(examples: Sequence[RankedExample], pad: int, width_multiple: int = 1,
                     answer_width_multiple: int = 1) -> RankingBatch:
    """The rankings as one SharedPromptBatch (`logprobs.collate_shared_prompt`, whose widths are rounded up to the
    multiples given); shorter rankings are masked."""
    k = max(len(example.completion_ids) for example in examples)
    mask = torch.tensor([[rank < len(example.completion_ids) for rank in range(k)] for example in examples])
    answers = collate_shared_prompt([example.prompt_ids for example in examples],
                                    [example.completion_ids for example in examples], pad, width_multiple,
                                    answer_width_multiple)
    return RankingBatch(answers, mask)


# ------------------------------------------------------------------------------------------------------ diagnostics


@dataclass
class PairwiseTally:
    """Running sums of pairwise diagnostics, so that micro-batches and evaluation chunks combine exactly.

    For scores s (a reward model's rewards, DPO's implicit rewards, or log-probabilities) of rankings listed best
    first: accuracy is the share of pairs i < j (i ranked above j) with s_i > s_j, over every pair of every
    ranking; margin the mean of s_i - s_j over the same pairs; chosen / rejected the mean score of the best / worst
    answer. For pairs (K = 2) these are the usual accuracy, margin (chosen - rejected), chosen and rejected.
    """

    pairs: int = 0
    correct: int = 0
    margin_sum: float = 0.0
    rankings: int = 0
    best_sum: float = 0.0
    worst_sum: float = 0.0

    def add(self, scores: Tensor, mask: Tensor) -> None:
        """Add the pairs of B rankings.

        Args:
            scores: (B, K), column 0 the best answer.
            mask: (B, K) bool, True where an answer exists (absent answers at the end).
        """
        scores = scores.detach().float()
        k = scores.shape[1]
        first, second = torch.triu_indices(k, k, offset=1)  # every pair i < j: i ranked above j
        margins = (scores[:, first] - scores[:, second])[mask[:, first] & mask[:, second]]  # (P,)
        last = mask.long().sum(dim=1) - 1  # (B,): column of each ranking's worst answer
        self.pairs += margins.numel()
        self.correct += int((margins > 0).sum())
        self.margin_sum += float(margins.sum())
        self.rankings += scores.shape[0]
        self.best_sum += float(scores[:, 0].sum())
        self.worst_sum += float(scores.gather(1, last.unsqueeze(1)).sum())

    def update(self, other: PairwiseTally) -> None:
        """Add another tally's sums to this one."""
        for name in ("pairs", "correct", "margin_sum", "rankings", "best_sum", "worst_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summed(self, processes) -> PairwiseTally:
        """This tally summed over the processes (`run.processes.Processes`): the whole batch's diagnostics."""
        names = ("pairs", "correct", "margin_sum", "rankings", "best_sum", "worst_sum")
        totals = processes.sum(*(getattr(self, name) for name in names))
        return PairwiseTally(**{name: type(getattr(self, name))(total) for name, total in zip(names, totals)})

    def means(self, prefix: str) -> dict[str, float]:
        """{prefix + "accuracy", "margin", "chosen", "rejected"} (NaN before any pair)."""
        pairs, rankings = self.pairs or math.nan, self.rankings or math.nan
        return {f"{prefix}accuracy": self.correct / pairs, f"{prefix}margin": self.margin_sum / pairs,
                f"{prefix}chosen": self.best_sum / rankings, f"{prefix}rejected": self.worst_sum / rankings}
