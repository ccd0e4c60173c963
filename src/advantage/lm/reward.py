"""Reward model: a scalar r(x, y) learned from preferences between completions (docs/math.md §5; InstructGPT).

The model is a transformer body with a linear head (`models.ScalarHeadModel`): the reward of completion y after
prompt x is the head's scalar at the last real token of the sequence x + y, which is the answer's end token: every
stage ends an answer with exactly one (a chat template's end of turn, or the EOS appended to plain text;
`tokenizer.end_completion`), and a sampled answer ends with the end token that stopped it, so the score is read at
the same position in training and in scoring. Starting weights: the body of
`config.model` (random for builtin:SIZE, or e.g. an SFT run's final/) and a fresh head.

Preferences are rankings y_1 > y_2 > ... > y_K of answers to the same prompt, best first; a preference pair is the
ranking (chosen, rejected) with K = 2. Writing r_k = r(x, y_k), the losses (objectives/preference.py, `loss`):

    bt             Bradley-Terry on pairs (docs/math.md §5): P(y_w > y_l | x) = sigma(r_w - r_l),
                   L = - mean_b log sigma(r_b,1 - r_b,2)
    kwise          InstructGPT's K-wise loss (docs/math.md §5): every one of the C(K, 2) pairs of a ranking is a
                   Bradley-Terry comparison, L = - mean_b 1 / C(K, 2) sum_{i<j} log sigma(r_b,i - r_b,j)
    plackett_luce  the Plackett-Luce likelihood of the whole ranking (docs/math.md §5): pick the best of the K answers,
                   then the best of the rest, ...: L = - mean_b sum_k [r_b,k - log sum_{j>=k} exp r_b,j]

For K = 2 all three are the same loss. Every loss depends on differences of rewards of the same prompt, so the
reward is defined up to a constant per prompt: only its comparisons between answers mean anything.
`center_rewards_coefficient` c > 0 adds c mean_b 1/C(K,2) sum_{i<j} (r_i + r_j)^2 (`reward_centering_loss`,
docs/math.md §6b; for pairs TRL's term of the same name), which pins that constant near 0.

Data: preference rows (prompt, chosen, rejected) or ranking rows (prompt, responses best first), see data.py, or
the files of `--task arithmetic`. `bt` needs pairs; the listwise losses take either (a pair is a ranking of 2).
`ranking_answers best_worst` keeps only the best and the worst answer of each training ranking, the cheaper
alternative to using the whole ranking at the same number of prompts (benchmarks/lm_rankings.py compares them);
held-out metrics always use every pair of every held-out ranking.

Normalisation. Each loss is a mean over the rankings (pairs) of the batch. A micro-batch's loss is the mean over
its own rankings times (its rankings / the batch's rankings), so the micro-batches' gradients add up to exactly the
gradient of the batch mean, whatever the accumulation.

metrics.jsonl (`step` = optimizer steps): the names docs/metrics.md gives reward; the pair figures (accuracy,
margin, chosen, rejected) count every pair i < j of every ranking.

final/ holds the reward model as `ScalarHeadModel.save_pretrained` writes it (the body in Hugging Face format,
the head beside it, the tokenizer); a later stage loads it with `ScalarHeadModel.from_pretrained(RUN_DIR/final)`.
With LoRA the adapters are always merged into final/ (`lora_merge` must stay true).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from advantage.lm.config import mixed_precision
from advantage.lm.cuda_graphs import GraphedPasses, padding_multiples, training_graphs
from advantage.lm.data_order import DataOrder, total_steps
from advantage.lm.loading import add_lora, end_ids, load_policy, max_length, pad_id
from advantage.lm.models import ScalarHeadModel, evaluation_mode, model_device
from advantage.lm.offline import BatchGradient, train_offline
from advantage.lm.preferences import (
    LISTWISE,
    PairwiseTally,
    PreferenceDataConfig,
    RankedExample,
    RankingBatch,
    best_and_worst,
    collate_rankings,
    data_fingerprint,
    data_kind,
    load_preference_rows,
    tokenize_rankings,
    validate_preference_data,
)
from advantage.lm.schedule import make_optimizer
from advantage.lm.session import LMSession
from advantage.lm.sharding import is_sharded, shard
from advantage.objectives.preference import (
    bradley_terry_loss,
    kwise_pairwise_loss,
    plackett_luce_loss,
    reward_centering_loss,
)
from advantage.run.config import param, require
from advantage.run.processes import to_device
from advantage.run.session import Run


@dataclass
class RewardConfig(PreferenceDataConfig):
    """The reward model's hyperparameters: every LMConfig field, the data fields, and the loss."""

    loss: Literal["bt", "kwise", "plackett_luce"] = param(
        "bt", "bt: Bradley-Terry on pairs; kwise: every pair of each ranking (InstructGPT); "
              "plackett_luce: the likelihood of the whole ranking (docs/math.md §5)")
    center_rewards_coefficient: float = param(
        0.0, "weight of the term that keeps the scores near 0, mean (r_i + r_j)^2 over each ranking's pairs "
             "(docs/math.md §6b; TRL's name; about 0.01 in its authors' use); 0: off")


CONFIG = RewardConfig
def validate(config: RewardConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_preference_data(config, config.loss, config.loss in LISTWISE)
    require(not config.lora_r or config.lora_merge, "lora_merge",
            "must be true for a reward model (final/ is read by ScalarHeadModel.from_pretrained, which needs "
            "merged weights)", config.lora_merge)
    require(config.center_rewards_coefficient >= 0 and math.isfinite(config.center_rewards_coefficient),
            "center_rewards_coefficient", "must be >= 0", config.center_rewards_coefficient)


# -------------------------------------------------------------------------------------------------------------- loss


def ranking_rewards(model: ScalarHeadModel, batch: RankingBatch) -> Tensor:
    """r(x, y_k) for every answer: the scalar at the last real token of each sequence.

    Returns:
        (B, K); entries at absent answers are meaningless (mask them with `batch.mask`).
    """
    return model.score_answers(batch.answers).view(batch.mask.shape)  # (B * K,) -> (B, K)


def ranking_loss(rewards: Tensor, mask: Tensor, loss: str, center_rewards_coefficient: float = 0.0) -> Tensor:
    """The reward-model loss of B rankings, a mean over the rankings (objectives/preference.py).

    Args:
        rewards: (B, K) rewards, column 0 the best answer.
        mask: (B, K) bool, True where an answer exists.
        loss: "bt" (K must be 2), "kwise" or "plackett_luce".
        center_rewards_coefficient: c of the added c `reward_centering_loss` (docs/math.md §6b); 0: none.
    Returns:
        Scalar.
    """
    if loss == "bt":
        value = bradley_terry_loss(rewards[:, 0], rewards[:, 1])  # docs/math.md §5
    elif loss == "kwise":
        value = kwise_pairwise_loss(rewards, mask)  # docs/math.md §5
    else:
        value = plackett_luce_loss(rewards, mask)  # docs/math.md §5
    if center_rewards_coefficient:
        value = value + center_rewards_coefficient * reward_centering_loss(rewards, mask)  # docs/math.md §6b
    return value


def accumulate_gradients(model: ScalarHeadModel, examples: Sequence[RankedExample], micro_batches: int, pad: int,
                         loss: str, world_size: int = 1, graphs: GraphedPasses | None = None,
                         center_rewards_coefficient: float = 0.0) -> tuple[float, PairwiseTally, int]:
    """Add the gradient of the batch's loss to `.grad`, one micro-batch at a time.

    Args:
        examples: this process's share of the batch (B / world_size rankings).
        micro_batches: how many consecutive micro-batches to split the share into (must divide it).
        loss, center_rewards_coefficient: as in `ranking_loss`.
        world_size: processes sharing the batch (their gradients are summed afterwards).
        graphs: run each micro-batch's pass as a replayed CUDA graph (`cuda_graphs.training_graphs`); the batches
            are then padded to recurring widths, with the same result.
    Returns:
        (loss, tally, real tokens): this share's part of the batch's loss L (the mean over its B rankings), its
        pairwise diagnostics, and the tokens it went through.
    """
    size = len(examples) // micro_batches
    loss_total, tally, real_tokens = 0.0, PairwiseTally(), 0
    for start in range(0, len(examples), size):
        micro = examples[start:start + size]
        # This micro-batch's share of the batch mean: every ranking weighs 1 / B, whichever micro-batch (and process)
        # holds it.
        weight = len(micro) / (len(examples) * world_size)
        # b prompts, b * K answers
        batch = to_device(collate_rankings(micro, pad, *padding_multiples(graphs is not None)), model_device(model))

        def backward_pass(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            ranked = batch.with_tensors(tensors)
            rewards = ranking_rewards(model, ranked)  # (b, K)
            share = ranking_loss(rewards, ranked.mask, loss, center_rewards_coefficient) * weight
            share.backward()  # accumulate: .grad sums the shares into the gradient of L
            return share, rewards

        inputs = batch.tensors()
        share, rewards = graphs(inputs, backward_pass) if graphs is not None else backward_pass(inputs)
        loss_total += float(share.detach())
        tally.add(rewards.detach(), batch.mask)
        real_tokens += batch.real_tokens
    return loss_total, tally, real_tokens


@torch.no_grad()
def evaluate(model: ScalarHeadModel, examples: Sequence[RankedExample], batch_size: int, pad: int,
             loss: str, center_rewards_coefficient: float = 0.0) -> dict[str, float]:
    """eval/loss and eval/accuracy, eval/margin, eval/chosen, eval/rejected over every pair of the held-out rankings."""
    with evaluation_mode(model):
        loss_total, tally = 0.0, PairwiseTally()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = to_device(collate_rankings(chunk, pad), model_device(model))
            rewards = ranking_rewards(model, batch)
            loss_total += float(ranking_loss(rewards, batch.mask, loss, center_rewards_coefficient)) \
                * len(chunk) / len(examples)
            tally.add(rewards, batch.mask)
    return {"eval/loss": loss_total, **tally.means("eval/")}


# ---------------------------------------------------------------------------------------------------------- training


def train(config: RewardConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Train a reward model on the preferences of `config.data` (or the built-in task); write the run directory.

    Returns:
        The Run, whose `.model` is the trained `ScalarHeadModel` as saved in final/ (adapters merged).
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    session = LMSession("reward", config, run_dir, resume)

    # 1. Data: rankings best first (a pair is a ranking of two), each answer ending with one end token.
    kind = data_kind(config, config.loss in LISTWISE)
    train_rows, eval_rows = load_preference_rows(config, session.run_dir, kind)
    policy, tokenizer = load_policy(config, session.processes.device)
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
    # which Adam (g / (|g| + eps)) would turn into a random walk of about lr per step: it stays at 0. The centring
    # term does move the level, and the bias is the direct way to move it.
    model.head.bias.requires_grad_(config.center_rewards_coefficient > 0)
    processes = session.processes
    if config.sharding == "fsdp":  # every decoder layer, then the whole model (lm/sharding.py)
        model = shard(model, processes.world_size, forward_methods=("score_answers",))
    # On a GPU each micro-batch's forward and backward pass replays as one CUDA graph (None: ordinary passes).
    graphs = training_graphs(model, processes.device, config.cuda_graphs, sharded=is_sharded(model),
                             world_size=processes.world_size, micro_batches=config.gradient_accumulation_steps,
                             checkpointing=config.gradient_checkpointing, autocast=config.mixed_precision != "no")
    torch.manual_seed(config.seed)  # the global RNG drives dropout (LoRA's included); checkpoints carry its state
    optimizer = make_optimizer(model, config)
    steps = total_steps(config, len(train_examples))
    order = DataOrder(len(train_examples), config.batch_size, config.seed, processes.rank, processes.world_size)
    session.start(model, optimizer, steps, data_fingerprint(train_examples))
    micro_size = config.batch_size // (processes.world_size * config.gradient_accumulation_steps)
    # Rank 0 alone evaluates, unless the model is sharded: then every process takes part in each forward pass.
    evaluating = bool(eval_examples) and (processes.is_main or is_sharded(model))

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, eval_examples, micro_size, pad, config.loss, config.center_rewards_coefficient)

    def accumulate(indices: Sequence[int]) -> BatchGradient:
        # 3-5. Collate the batch's micro-batches, score every answer, accumulate the gradient of the batch mean.
        loss, tally, real_tokens = accumulate_gradients(model, [train_examples[index] for index in indices],
                                                        config.gradient_accumulation_steps, pad, config.loss,
                                                        processes.world_size, graphs,
                                                        config.center_rewards_coefficient)
        return BatchGradient(loss, real_tokens, tally=tally)

    step, last = train_offline(session, model, optimizer, order, steps, config, "losses/reward", accumulate,
                               held_out if evaluating else None, lambda step: {"data_order": order.state(step)})

    if lora_model is not None and not is_sharded(model):
        # Folds the adapters into the shared body in place: final/ is plain weights. A sharded model's are folded
        # into the gathered copy that `finish` writes.
        lora_model.merge_and_unload()
    model = session.finish(model, tokenizer, step)
    return Run(session.run_dir, "reward", config, last, step, model, tokenizer)
