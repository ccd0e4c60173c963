"""Reward model: a scalar r(x, y) learned from preferences between completions (seed 004; seed 000, InstructGPT).

The model is a transformer body with a linear head (`models.ScalarHeadModel`): the reward of completion y after
prompt x is the head's scalar at the last real token of the sequence x + y, which is the answer's end token: every
stage ends an answer with exactly one (a chat template's end of turn, or the EOS appended to plain text;
`tokenizer.end_completion`), and a sampled answer ends with the end token that stopped it, so the score is read at
the same position in training and in scoring. Starting weights: the body of
`config.model` (random for builtin:SIZE, or e.g. an SFT run's final/) and a fresh head.

Preferences are rankings y_1 > y_2 > ... > y_K of answers to the same prompt, best first; a preference pair is the
ranking (chosen, rejected) with K = 2. Writing r_k = r(x, y_k), the losses (objectives/preference.py, `loss`):

    bt             Bradley-Terry on pairs (seed 004): P(y_w > y_l | x) = sigma(r_w - r_l),
                   L = - mean_b log sigma(r_b,1 - r_b,2)
    kwise          InstructGPT's K-wise loss (seed 000): every one of the C(K, 2) pairs of a ranking is a
                   Bradley-Terry comparison, L = - mean_b 1 / C(K, 2) sum_{i<j} log sigma(r_b,i - r_b,j)
    plackett_luce  the Plackett-Luce likelihood of the whole ranking (seed 004): pick the best of the K answers,
                   then the best of the rest, ...: L = - mean_b sum_k [r_b,k - log sum_{j>=k} exp r_b,j]

For K = 2 all three are the same loss. Every loss depends on differences of rewards of the same prompt, so the
reward is defined up to a constant per prompt: only its comparisons between answers mean anything.

Data: preference rows (prompt, chosen, rejected) or ranking rows (prompt, responses best first), see data.py, or
the files of `--task arithmetic`. `bt` needs pairs; the listwise losses take either (a pair is a ranking of 2).
`ranking_answers best_worst` keeps only the best and the worst answer of each training ranking, the cheaper
alternative to using the whole ranking at the same number of prompts (benchmarks/lm_rankings.py compares them);
held-out metrics always use every pair of every held-out ranking.

Normalisation. Each loss is a mean over the rankings (pairs) of the batch. A micro-batch's loss is the mean over
its own rankings times (its rankings / the batch's rankings), so the micro-batches' gradients add up to exactly the
gradient of the batch mean, whatever the accumulation.

metrics.jsonl (`step` = optimizer steps; `time_s` = wall seconds since the start, carried across resumes):

    losses/reward         the loss L of the step's batch
    losses/grad_norm      global gradient norm before clipping
    rewards/accuracy      share of the batch's pairs (every pair i < j of every ranking) with r_i > r_j
    rewards/margin        mean r_i - r_j over the same pairs (chosen - rejected for pairs)
    rewards/chosen        mean reward of the best answer of each ranking
    rewards/rejected      mean reward of the worst answer of each ranking
    charts/learning_rate, charts/tokens_per_s, charts/epoch, charts/skipped_updates   as in sft
    eval/loss             L on the held-out rankings (logged at step 0, every eval_every steps and at the end)
    eval/accuracy, eval/margin, eval/chosen, eval/rejected   the rewards/ figures on the held-out rankings

final/ holds the reward model as `ScalarHeadModel.save_pretrained` writes it (the body in Hugging Face format,
the head beside it, the tokenizer); a later stage loads it with `ScalarHeadModel.from_pretrained(RUN_DIR/final)`.
With LoRA the adapters are always merged into final/ (`lora_merge` must stay true).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from advantage.lm.data import Row, load_rows, preference_triples, rankings
from advantage.lm.logprobs import SharedPromptBatch, collate_shared_prompt
from advantage.lm.models import ScalarHeadModel
from advantage.lm.session import (
    DataOrder,
    LMConfig,
    LMRun,
    LMSession,
    StepWindow,
    add_lora,
    end_ids,
    fingerprint,
    learning_rate_at,
    load_policy,
    make_optimizer,
    max_length,
    mixed_precision,
    pad_id,
    require,
    task_files,
    total_steps,
    validate_lm,
)
from advantage.lm.sft import keep_trainable, tokenize_pairs
from advantage.objectives.preference import bradley_terry_loss, kwise_pairwise_loss, plackett_luce_loss
from advantage.run.config import param


@dataclass
class PreferenceDataConfig(LMConfig):
    """The fields of every stage that learns from preferences (reward, dpo): which columns, which answers."""

    data_kind: Literal["auto", "preference", "ranking"] = param(
        "auto", "columns of the data: preference (prompt, chosen, rejected) or ranking (prompt, responses best "
                "first); auto: ranking for the listwise losses, preference otherwise")
    ranking_answers: Literal["all", "best_worst"] = param(
        "all", "ranking data: train on every answer of each ranking, or only on its best and worst (one pair per "
               "prompt); held-out metrics always use every pair")


@dataclass
class RewardConfig(PreferenceDataConfig):
    """The reward model's hyperparameters: every LMConfig field, the data fields, and the loss."""

    loss: Literal["bt", "kwise", "plackett_luce"] = param(
        "bt", "bt: Bradley-Terry on pairs (seed 004); kwise: every pair of each ranking (InstructGPT, seed 000); "
              "plackett_luce: the likelihood of the whole ranking (seed 004)")


CONFIG = RewardConfig
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


def validate(config: RewardConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_preference_data(config, config.loss, config.loss in LISTWISE)
    require(not config.lora_r or config.lora_merge, "lora_merge",
            "must be true for a reward model (final/ is read by ScalarHeadModel.from_pretrained, which needs "
            "merged weights)", config.lora_merge)


# ---------------------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class RankedExample:
    """One tokenized prompt and its K >= 2 answers, best first (a preference pair: chosen, rejected).

    Attributes:
        prompt_ids: the prompt's token ids (the initial state, seed 003).
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
    """Token ids of every row's prompt and answers (each ending with one end token, `sft.tokenize_pairs`; each
    prompt + answer cut to `length` tokens).

    A preference row becomes the ranking (chosen, rejected). Cuts are reported on stderr, as in sft; rows left with
    nothing to compare (an answer cut to no token, or all cut to the same tokens) are left out (`sft.keep_trainable`).
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
    """`session.fingerprint` of the tokenized rankings (a resumed run refuses changed data)."""
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


def collate_rankings(examples: Sequence[RankedExample], pad: int) -> RankingBatch:
    """The rankings as one SharedPromptBatch (`logprobs.collate_shared_prompt`); shorter rankings are masked."""
    k = max(len(example.completion_ids) for example in examples)
    mask = torch.zeros((len(examples), k), dtype=torch.bool)
    for b, example in enumerate(examples):
        mask[b, :len(example.completion_ids)] = True
    answers = collate_shared_prompt([example.prompt_ids for example in examples],
                                    [example.completion_ids for example in examples], pad)
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
        """This tally summed over the processes (`session.Processes`): the whole batch's diagnostics."""
        names = ("pairs", "correct", "margin_sum", "rankings", "best_sum", "worst_sum")
        totals = processes.sum(*(getattr(self, name) for name in names))
        return PairwiseTally(**{name: type(getattr(self, name))(total) for name, total in zip(names, totals)})

    def means(self, prefix: str) -> dict[str, float]:
        """{prefix + "accuracy", "margin", "chosen", "rejected"} (NaN before any pair)."""
        pairs, rankings = self.pairs or math.nan, self.rankings or math.nan
        return {f"{prefix}accuracy": self.correct / pairs, f"{prefix}margin": self.margin_sum / pairs,
                f"{prefix}chosen": self.best_sum / rankings, f"{prefix}rejected": self.worst_sum / rankings}


# -------------------------------------------------------------------------------------------------------------- loss


def ranking_rewards(model: ScalarHeadModel, batch: RankingBatch) -> Tensor:
    """r(x, y_k) for every answer: the scalar at the last real token of each sequence.

    Returns:
        (B, K); entries at absent answers are meaningless (mask them with `batch.mask`).
    """
    return model.score_answers(batch.answers).view(batch.mask.shape)  # (B * K,) -> (B, K)


def ranking_loss(rewards: Tensor, mask: Tensor, loss: str) -> Tensor:
    """The reward-model loss of B rankings, a mean over the rankings (objectives/preference.py).

    Args:
        rewards: (B, K) rewards, column 0 the best answer.
        mask: (B, K) bool, True where an answer exists.
        loss: "bt" (K must be 2), "kwise" or "plackett_luce".
    Returns:
        Scalar.
    """
    if loss == "bt":
        return bradley_terry_loss(rewards[:, 0], rewards[:, 1])  # seed 004
    if loss == "kwise":
        return kwise_pairwise_loss(rewards, mask)  # seed 000
    return plackett_luce_loss(rewards, mask)  # seed 004


def accumulate_gradients(model: ScalarHeadModel, examples: Sequence[RankedExample], micro_batches: int, pad: int,
                         loss: str, world_size: int = 1) -> tuple[float, PairwiseTally, int]:
    """Add the gradient of the batch's loss to `.grad`, one micro-batch at a time.

    Args:
        examples: this process's share of the batch (B / world_size rankings).
        micro_batches: how many consecutive micro-batches to split the share into (must divide it).
        loss: as in `ranking_loss`.
        world_size: processes sharing the batch (their gradients are summed afterwards).
    Returns:
        (loss, tally, real tokens): this share's part of the batch's loss L (the mean over its B rankings), its
        pairwise diagnostics, and the tokens it went through.
    """
    size = len(examples) // micro_batches
    loss_total, tally, real_tokens = 0.0, PairwiseTally(), 0
    for start in range(0, len(examples), size):
        micro = examples[start:start + size]
        batch = collate_rankings(micro, pad)  # b prompts, b * K answers
        rewards = ranking_rewards(model, batch)  # (b, K)
        # This micro-batch's share of the batch mean: every ranking weighs 1 / B, whichever micro-batch (and process)
        # holds it.
        share = ranking_loss(rewards, batch.mask, loss) * (len(micro) / (len(examples) * world_size))
        share.backward()  # accumulate: .grad sums the shares into the gradient of L
        loss_total += float(share.detach())
        tally.add(rewards, batch.mask)
        real_tokens += batch.real_tokens
    return loss_total, tally, real_tokens


@torch.no_grad()
def evaluate(model: ScalarHeadModel, examples: Sequence[RankedExample], batch_size: int, pad: int,
             loss: str) -> dict[str, float]:
    """eval/loss and eval/accuracy, eval/margin, eval/chosen, eval/rejected over every pair of the held-out rankings."""
    was_training = model.training
    model.eval()
    loss_total, tally = 0.0, PairwiseTally()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_rankings(chunk, pad)
        rewards = ranking_rewards(model, batch)
        loss_total += float(ranking_loss(rewards, batch.mask, loss)) * len(chunk) / len(examples)
        tally.add(rewards, batch.mask)
    model.train(was_training)
    return {"eval/loss": loss_total, **tally.means("eval/")}


# ---------------------------------------------------------------------------------------------------------- training


def train(config: RewardConfig, run_dir: str | Path, resume: bool = False) -> LMRun:
    """Train a reward model on the preferences of `config.data` (or the built-in task); write the run directory.

    Returns:
        The LMRun, whose `.model` is the trained `ScalarHeadModel` as saved in final/ (adapters merged).
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    session = LMSession("reward", config, run_dir, resume)

    # 1. Data: rankings best first (a pair is a ranking of two), each answer ending with one end token.
    kind = data_kind(config, config.loss in LISTWISE)
    train_rows, eval_rows = load_preference_rows(config, session.run_dir, kind)
    policy, tokenizer = load_policy(config)
    pad, length, ends = pad_id(tokenizer), max_length(config, policy), end_ids(tokenizer, policy)
    train_examples = tokenize_rankings(train_rows, kind, tokenizer, length, "training", ends)
    eval_examples = tokenize_rankings(eval_rows, kind, tokenizer, length, "evaluation", ends) if eval_rows else []
    eval_examples = eval_examples[:config.eval_max_prompts or None]
    if config.ranking_answers == "best_worst":
        train_examples = best_and_worst(train_examples)

    # 2. The model: the policy's body (with LoRA adapters if asked) and a fresh scalar head; the LM head is unused.
    lora_model = add_lora(policy, config) if config.lora_r else None  # kept: merging goes through it at the end
    model = ScalarHeadModel.from_causal_lm(lora_model.get_base_model() if lora_model else policy, seed=config.seed,
                                           share_body=True).train()
    del policy  # without LoRA nothing else holds the language-model head: it can be freed
    # Every loss depends on reward differences only, so the head's bias has a gradient of exactly 0 up to rounding,
    # which Adam (g / (|g| + eps)) would turn into a random walk of about lr per step: it stays at 0.
    model.head.bias.requires_grad_(False)
    torch.manual_seed(config.seed)  # the global RNG drives dropout (LoRA's included); checkpoints carry its state
    optimizer = make_optimizer(model, config)
    steps = total_steps(config, len(train_examples))
    processes = session.processes
    order = DataOrder(len(train_examples), config.batch_size, config.seed, processes.rank, processes.world_size)
    session.start(model, optimizer, steps, data_fingerprint(train_examples))
    micro_size = config.batch_size // (processes.world_size * config.gradient_accumulation_steps)
    evaluating = bool(eval_examples) and processes.is_main  # rank 0 alone evaluates
    max_norm = config.max_grad_norm or math.inf
    step = session.start_step
    last: dict = {}
    window = StepWindow()
    tally = PairwiseTally()

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, eval_examples, micro_size, pad, config.loss)

    if step == 0 and evaluating:  # the starting point, for comparison
        last = session.metrics.log(0, session.elapsed(), held_out())
    while step < steps:
        began = time.perf_counter()
        learning_rate = learning_rate_at(config, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        # 3-5. Collate the batch's micro-batches, score every answer, accumulate the gradient of the batch mean.
        examples = [train_examples[index] for index in order.batch(step)]
        with mixed_precision(config):
            loss, batch_tally, real_tokens = accumulate_gradients(model, examples, config.gradient_accumulation_steps,
                                                                  pad, config.loss, processes.world_size)
        loss, real_tokens = processes.sum(loss, real_tokens)
        batch_tally = batch_tally.summed(processes)
        processes.sum_gradients(model)  # the gradient of the whole batch, on every process

        # 6. One optimizer step (skipped, and counted, if the loss is not finite).
        if window.optimizer_step(session, optimizer, loss, max_norm):
            tally.update(batch_tally)
        step += 1
        window.end_step(real_tokens, time.perf_counter() - began)

        # 7. Log (averaged over the steps since the last line), with the held-out metrics when they are due.
        evaluation_due = evaluating and session.evaluation_due(step)
        if step % config.log_every == 0 or step == steps or evaluation_due:
            logged = {**window.figures("losses/reward"),
                      **tally.means("rewards/"),
                      "charts/learning_rate": learning_rate,
                      "charts/epoch": order.epochs_done(step),
                      "charts/skipped_updates": session.skipped_updates}
            if evaluation_due:
                logged.update(held_out())
            last = session.metrics.log(step, session.elapsed(), logged)
            session.show(step, {"loss": logged["losses/reward"], "acc": logged["rewards/accuracy"]})
            window, tally = StepWindow(), PairwiseTally()

        # 8. Checkpoint.
        if session.checkpoint_due(step):
            session.save(step, {"data_order": order.state(step)})

    if lora_model is not None:
        lora_model.merge_and_unload()  # folds the adapters into the shared body in place: final/ is plain weights
    model = session.finish(model, tokenizer, step)
    return LMRun(session.run_dir, "reward", config, last, step, model, tokenizer)
