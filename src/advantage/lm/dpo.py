"""Direct Preference Optimization (DPO): the reward model's loss, written in terms of the policy (docs/math.md §6).

The KL-regularised objective max_pi E_x E_{y ~ pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x)) is maximised by
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so every reward has a policy that is optimal for it, and
conversely r(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x) (docs/math.md §6). Substituting this implicit
reward into the reward model's likelihoods (reward.py), Z(x) cancels in every comparison of answers to the same prompt.
With h(y) = log pi(y|x) - log pi_ref(y|x), the log-ratio of the trained policy to the reference, the losses are

    sigmoid        Bradley-Terry on pairs (docs/math.md §6): L = - mean_b log sigma(beta [h(y_w) - h(y_l)]);
                   with label_smoothing eps, conservative DPO (docs/math.md §6b):
                   L = - mean_b [(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)], Delta = h(y_w) - h(y_l)
    plackett_luce  Plackett-Luce on rankings best first (docs/math.md §6), h_k = h(y_k):
                   L = - mean_b sum_k [beta h_k - log sum_{j>=k} exp(beta h_j)]
    ipo            IPO on pairs (docs/math.md §6b): L = mean_b (Delta - 1 / (2 beta))^2
    hinge          the hinge on the implicit margin (docs/math.md §6b): L = mean_b max(0, 1 - beta Delta)
    simpo          SimPO on pairs, without a reference (docs/math.md §6b), with g(y) = beta/|y| log pi(y|x):
                   L = - mean_b log sigma(g(y_w) - g(y_l) - gamma)

and with rpo_alpha > 0, RPO (docs/math.md §6b) adds the preferred answer's negative log-likelihood per token to any
of them: L + alpha L_NLL, L_NLL = - mean_b log pi(y_w|x) / |y_w| (`objectives.preference.chosen_nll_loss`).

For K = 2 sigmoid and plackett_luce are the same loss; ipo and hinge are not derived in the notes, but keep their
reference, data and implicit rewards; simpo needs no reference (none is computed) and its implicit reward is g(y).
log pi(y|x) is the sequence log-probability sum_t log pi(a_t|s_t) of the completion tokens (its end token included)
given the prompt (docs/math.md §7b), computed by `logprobs.answer_sequence_log_probs` (each prompt run once for all
its answers, so a pair costs one prompt, not two). The losses come from objectives/preference.py (`dpo_loss`,
`plackett_luce_dpo_loss`, `ipo_loss`, `hinge_dpo_loss`, `simpo_loss`, `chosen_nll_loss`).

The reference. pi_ref is the starting model, and its log-probabilities of the fixed data never change: they are
computed once, before training, over the whole training set and the held-out set, with the starting model in eval
mode (no dropout). Then the same model object is trained, so no second copy of the model is ever in memory. With
LoRA the reference is computed with the adapters disabled: the base model.
Every checkpoint stores the reference log-probabilities, so a resumed run uses bit-identical values without
recomputing them.

Normalisation. The loss is a mean over the pairs (rankings) of the whole batch: a micro-batch's loss is the mean
over its own pairs times (its pairs / the batch's pairs), so the accumulated gradient is that of the batch mean for
any number of micro-batches.

metrics.jsonl (`step` = optimizer steps): the names docs/metrics.md gives dpo. The implicit reward of an answer
is beta (log pi(y|x) - log pi_ref(y|x)), so at step 0 every implicit margin is exactly 0 (SimPO's reward is
beta/|y| log pi(y|x)); eval/logp_accuracy is the policy's own preference, which, unlike the implicit reward, can be
compared with the starting model's.

final/ is the trained causal LM in Hugging Face format (merged, or the PEFT adapter with lora_merge false), as sft.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantage.errors import UsageError
from advantage.lm.config import mixed_precision
from advantage.lm.cuda_graphs import GraphedPasses, padding_multiples, training_graphs
from advantage.lm.data_order import DataOrder, total_steps
from advantage.lm.loading import add_lora, end_ids, load_policy, max_length, pad_id
from advantage.lm.logprobs import answer_sequence_log_probs
from advantage.lm.models import evaluation_mode, model_device
from advantage.lm.offline import BatchGradient, train_offline
from advantage.lm.preferences import (
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
    chosen_nll_loss,
    dpo_loss,
    hinge_dpo_loss,
    ipo_loss,
    plackett_luce_dpo_loss,
    simpo_loss,
)
from advantage.run.config import param, require
from advantage.run.processes import Processes, to_device
from advantage.run.session import Run


@dataclass
class DPOConfig(PreferenceDataConfig):
    """DPO's hyperparameters: every LMConfig field, the preference-data fields, the loss and beta."""

    loss: Literal["sigmoid", "plackett_luce", "ipo", "hinge", "simpo"] = param(
        "sigmoid", "sigmoid: Bradley-Terry on pairs; plackett_luce: the likelihood of whole rankings "
                   "(docs/math.md §6); ipo: squared error to 1/(2 beta); hinge: max(0, 1 - margin); simpo: "
                   "length-normalised log-likelihoods, no reference (§6b)")
    beta: float = param(0.1, "strength of the KL to the reference: the implicit reward is beta log pi / pi_ref")
    label_smoothing: float = param(0.0, "sigmoid loss: the chance eps that a pair's label is wrong (conservative "
                                        "DPO, docs/math.md §6b); 0 is DPO")
    rpo_alpha: float = param(0.0, "RPO: alpha times the preferred answer's negative log-likelihood per token is added "
                                  "to the loss (docs/math.md §6b); 0 is DPO")
    simpo_gamma: float = param(0.5, "SimPO's target margin gamma between the preferred and the other answer's "
                                    "beta/|y| log pi (loss simpo only)")


CONFIG = DPOConfig


def validate(config: DPOConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_preference_data(config, config.loss, config.loss == "plackett_luce")
    require(config.beta > 0 and math.isfinite(config.beta), "beta", "must be > 0", config.beta)
    require(0 <= config.label_smoothing < 0.5, "label_smoothing", "must lie in [0, 0.5)", config.label_smoothing)
    require(config.label_smoothing == 0 or config.loss == "sigmoid", "label_smoothing",
            f"applies to the sigmoid loss only, not {config.loss}", config.label_smoothing)
    require(config.rpo_alpha >= 0 and math.isfinite(config.rpo_alpha), "rpo_alpha", "must be >= 0", config.rpo_alpha)
    require(config.simpo_gamma >= 0 and math.isfinite(config.simpo_gamma), "simpo_gamma", "must be >= 0",
            config.simpo_gamma)


# ------------------------------------------------------------------------------------------------------- log-probs


def ranking_log_probs(model: nn.Module, batch: RankingBatch, fixed_shape: bool = False) -> Tensor:
    """log pi(y_k | x) of every answer of every ranking, each prompt run once (`logprobs.answer_sequence_log_probs`;
    `fixed_shape` as there).

    Returns:
        (B, K) float32; 0 where a ranking has no answer k.
    """
    return answer_sequence_log_probs(model, batch.answers, fixed_shape=fixed_shape).view(batch.mask.shape)


@torch.no_grad()
def reference_log_probs(model: nn.Module, examples: Sequence[RankedExample], batch_size: int, pad: int,
                        processes: Processes | None = None, graphs: GraphedPasses | None = None) -> Tensor:
    """log pi_ref(y_k | x) of every answer of every example, with `model` as the reference, in eval mode.

    Args:
        examples: N rankings.
        batch_size: rankings per forward pass (the evaluation uses the same chunks, so that at step 0 the
            held-out policy and reference log-probabilities are bit-identical).
        processes: with several, each computes every world_size-th example and they exchange the results.
        graphs: replay each chunk's forward pass as a CUDA graph (`cuda_graphs.GraphedPasses` without gradients);
            the chunks are then padded to recurring widths and scored over fixed shapes, with the same result.
    Returns:
        (N, K_max) float32; 0 where a ranking has fewer answers.
    """
    rank, world_size = (processes.rank, processes.world_size) if processes else (0, 1)
    if is_sharded(model):  # every process must run every forward pass of a sharded model: each computes them all
        rank, world_size, processes = 0, 1, None
    share = examples[rank::world_size]
    width = max(len(example.completion_ids) for example in examples)
    widths = padding_multiples(graphs is not None)

    def scored(batch: RankingBatch) -> Tensor:  # (b, K)
        if graphs is None:
            return ranking_log_probs(model, batch)
        return graphs(batch.tensors(), lambda tensors: (
            ranking_log_probs(model, batch.with_tensors(tensors), fixed_shape=True),))[0]

    with evaluation_mode(model):
        chunks = [scored(to_device(collate_rankings(share[start:start + batch_size], pad, *widths),
                                   model_device(model)))
                  for start in range(0, len(share), batch_size)]
    local = torch.cat([F.pad(chunk, (0, width - chunk.shape[1])) for chunk in chunks]) if chunks \
        else torch.zeros((0, width))
    return processes.gather_rows(local, len(examples)) if processes else local  # (N, K_max)


# -------------------------------------------------------------------------------------------------------------- loss


def preference_loss(policy_log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor, loss: str,
                    beta: float, label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                    answer_lengths: Tensor | None = None, simpo_gamma: float = 0.5) -> tuple[Tensor, Tensor]:
    """DPO's loss of B rankings, a mean over the rankings (objectives/preference.py), and the implicit rewards.

    Args:
        policy_log_probs: (B, K) sequence log-probabilities, column 0 the best answer.
        ref_log_probs: (B, K') with K' >= K (the reference of the whole data set may be wider than this batch).
        mask: (B, K) bool, True where an answer exists.
        loss: "sigmoid", "ipo", "hinge" or "simpo" (K must be 2), or "plackett_luce".
        label_smoothing: eps of the sigmoid loss (conservative DPO; 0 is DPO).
        rpo_alpha: weight of RPO's term, the best answer's negative log-likelihood per token (0: none).
        answer_lengths: (B, K) tokens of each answer; needed when rpo_alpha > 0 and by simpo (`needs_lengths`).
        simpo_gamma: SimPO's target margin.
    Returns:
        (scalar loss, (B, K) detached implicit rewards beta (log pi - log pi_ref); simpo's beta/|y| log pi).
    """
    if needs_lengths(loss, rpo_alpha) and answer_lengths is None:
        raise ValueError(f"loss {loss!r} with rpo_alpha {rpo_alpha} needs the answers' lengths")
    ref_log_probs = ref_log_probs[:, :policy_log_probs.shape[1]]
    if loss == "plackett_luce":
        value, rewards = plackett_luce_dpo_loss(policy_log_probs, ref_log_probs, beta, mask)  # docs/math.md §6
    else:
        pair = (policy_log_probs[:, 0], policy_log_probs[:, 1], ref_log_probs[:, 0], ref_log_probs[:, 1])
        if loss == "ipo":
            value, stats = ipo_loss(*pair, beta)  # docs/math.md §6b
        elif loss == "hinge":
            value, stats = hinge_dpo_loss(*pair, beta)  # docs/math.md §6b
        elif loss == "simpo":  # docs/math.md §6b: the reference columns are not read
            value, stats = simpo_loss(pair[0], pair[1], answer_lengths[:, 0], answer_lengths[:, 1], beta, simpo_gamma)
        else:
            value, stats = dpo_loss(*pair, beta, label_smoothing)  # docs/math.md §6 (§6b with label smoothing)
        rewards = torch.stack([stats.chosen_rewards, stats.rejected_rewards], dim=1)
    if rpo_alpha > 0:  # RPO, docs/math.md §6b: + alpha L_NLL of the best answer
        value = value + rpo_alpha * chosen_nll_loss(policy_log_probs[:, 0], answer_lengths[:, 0])
    return value, rewards


def needs_lengths(loss: str, rpo_alpha: float) -> bool:
    """Whether `preference_loss` reads the answers' lengths: SimPO's normalisation and RPO's term do."""
    return loss == "simpo" or rpo_alpha > 0


def answer_lengths(batch: RankingBatch) -> Tensor:
    """(B, K) tokens of every answer (end token included; 0 where a ranking has no answer k)."""
    return batch.answers.answer_mask.sum(dim=-1).view(batch.mask.shape)


def accumulate_gradients(model: nn.Module, examples: Sequence[RankedExample], reference: Tensor, micro_batches: int,
                         pad: int, loss: str, beta: float, world_size: int = 1,
                         graphs: GraphedPasses | None = None, label_smoothing: float = 0.0,
                         rpo_alpha: float = 0.0, simpo_gamma: float = 0.5) -> tuple[float, PairwiseTally, int]:
    """Add the gradient of the batch's DPO loss to `.grad`, one micro-batch at a time.

    Args:
        examples: this process's share of the batch (B / world_size rankings).
        reference: (B / world_size, K_max) their reference log-probabilities.
        micro_batches: how many consecutive micro-batches to split the share into (must divide it).
        world_size: processes sharing the batch (their gradients are summed afterwards).
        graphs: run each micro-batch's pass as a replayed CUDA graph (`cuda_graphs.training_graphs`); the batches
            are then padded to recurring widths and scored over fixed shapes, with the same result.
        loss, beta, label_smoothing, rpo_alpha, simpo_gamma: as `preference_loss`.
    Returns:
        (loss, tally of the implicit rewards, real tokens): this share's part of the batch mean L, its pairwise
        diagnostics, the tokens.
    """
    size = len(examples) // micro_batches
    loss_total, tally, real_tokens = 0.0, PairwiseTally(), 0
    for start in range(0, len(examples), size):
        micro = examples[start:start + size]
        # This micro-batch's share of the batch mean: every pair weighs 1 / B, whichever micro-batch (and process)
        # holds it.
        weight = len(micro) / (len(examples) * world_size)
        # b prompts, b * K answers
        batch = to_device(collate_rankings(micro, pad, *padding_multiples(graphs is not None)), model_device(model))
        inputs = {**batch.tensors(), "reference": reference[start:start + size]}

        def backward_pass(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            ranked = batch.with_tensors(tensors)
            policy = ranking_log_probs(model, ranked, fixed_shape=graphs is not None)  # (b, K): log pi_theta(y_k|x)
            value, rewards = preference_loss(policy, tensors["reference"], ranked.mask, loss, beta, label_smoothing,
                                             rpo_alpha, answer_lengths(ranked) if needs_lengths(loss, rpo_alpha)
                                             else None, simpo_gamma)
            share = value * weight
            share.backward()  # accumulate: .grad sums the shares into the gradient of L
            return share, rewards

        share, rewards = graphs(inputs, backward_pass) if graphs is not None else backward_pass(inputs)
        loss_total += float(share.detach())
        tally.add(rewards, batch.mask)
        real_tokens += batch.real_tokens
    return loss_total, tally, real_tokens


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[RankedExample], reference: Tensor, batch_size: int, pad: int,
             loss: str, beta: float, label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
             simpo_gamma: float = 0.5) -> dict[str, float]:
    """The held-out metrics (eval/loss, implicit-reward figures, logp_accuracy, logp_margin), in eval mode.

    `reference` must come from `reference_log_probs` with the same `batch_size`, so that the batches match.
    """
    with evaluation_mode(model):
        loss_total, implicit, own = 0.0, PairwiseTally(), PairwiseTally()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = to_device(collate_rankings(chunk, pad), model_device(model))
            policy = ranking_log_probs(model, batch)  # (b, K)
            value, rewards = preference_loss(policy, reference[start:start + batch_size], batch.mask, loss, beta,
                                             label_smoothing, rpo_alpha,
                                             answer_lengths(batch) if needs_lengths(loss, rpo_alpha) else None,
                                             simpo_gamma)
            loss_total += float(value) * len(chunk) / len(examples)
            implicit.add(rewards, batch.mask)
            own.add(policy, batch.mask)
    log_probs = own.means("eval/logp_")
    return {"eval/loss": loss_total, **implicit.means("eval/"),
            "eval/logp_accuracy": log_probs["eval/logp_accuracy"], "eval/logp_margin": log_probs["eval/logp_margin"]}


# ---------------------------------------------------------------------------------------------------------- training


def _widest(examples: Sequence[RankedExample]) -> int:
    """The most answers of any ranking (the width of its reference log-probabilities)."""
    return max((len(example.completion_ids) for example in examples), default=0)


def train(config: DPOConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Fine-tune `config.model` with DPO on the preferences of `config.data` (or the built-in task).

    Returns:
        The Run, whose `.model` is the trained causal LM as saved in final/ (merged, with LoRA and lora_merge).
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    session = LMSession("dpo", config, run_dir, resume)

    # 1. Data: rankings best first (a pair is a ranking of two), each answer ending with one end token.
    kind = data_kind(config, config.loss == "plackett_luce")
    train_rows, eval_rows = load_preference_rows(config, session.run_dir, kind)
    model, tokenizer = load_policy(config, session.processes.device)
    pad, length, ends = pad_id(tokenizer), max_length(config, model), end_ids(tokenizer, model)
    train_examples = tokenize_rankings(train_rows, kind, tokenizer, length, "training", ends)
    eval_examples = tokenize_rankings(eval_rows, kind, tokenizer, length, "evaluation", ends) if eval_rows else []
    eval_examples = eval_examples[:config.eval_max_prompts or None]
    if config.ranking_answers == "best_worst":
        train_examples = best_and_worst(train_examples)
    processes = session.processes
    micro_size = config.batch_size // (processes.world_size * config.gradient_accumulation_steps)

    # 2. The trained model is the same object: with LoRA, only adapters on it; sharded over the processes if asked.
    if config.lora_r:
        model = add_lora(model, config)
    if config.sharding == "fsdp":
        model = shard(model, processes.world_size)
    # Rank 0 alone evaluates, unless the model is sharded: then every process takes part in each forward pass.
    evaluating = bool(eval_examples) and (processes.is_main or is_sharded(model))

    # On a GPU each micro-batch's forward and backward pass, and each chunk of the reference pass, replays as one
    # CUDA graph (None: ordinary passes).
    graphs = training_graphs(model, processes.device, config.cuda_graphs, sharded=is_sharded(model),
                             world_size=processes.world_size, micro_batches=config.gradient_accumulation_steps,
                             checkpointing=config.gradient_checkpointing, autocast=config.mixed_precision != "no")

    # 3. Reference log-probabilities, once, with the starting model (with LoRA: the adapters disabled); a resumed
    #    run reads the values its checkpoint stored instead.
    reference = eval_reference = None
    if session.checkpoint_path is None and config.loss == "simpo":  # SimPO reads no reference: none is computed
        reference = processes.put(torch.zeros((len(train_examples), _widest(train_examples))))
        eval_reference = processes.put(torch.zeros((len(eval_examples), _widest(eval_examples)))) if evaluating \
            else None
    elif session.checkpoint_path is None:
        with model.disable_adapter() if config.lora_r else contextlib.nullcontext(), mixed_precision(config):
            # Graphs without gradients, in a memory pool of their own, freed when the pass returns (a pool shared
            # with the training graphs would be left with no graph using it, and the allocator refuses to capture
            # into such a pool again).
            reference = reference_log_probs(model, train_examples, micro_size, pad, processes,
                                            GraphedPasses((), capture=graphs.capture) if graphs is not None else None)
            # The evaluating process(es), in the evaluation's own chunks (bit-identical margins of 0 at step 0).
            eval_reference = reference_log_probs(model, eval_examples, micro_size, pad) if evaluating else None
    model.train()
    torch.manual_seed(config.seed)  # the global RNG drives dropout (LoRA's included); checkpoints carry its state
    optimizer = make_optimizer(model, config)
    steps = total_steps(config, len(train_examples))
    order = DataOrder(len(train_examples), config.batch_size, config.seed, processes.rank, processes.world_size)
    # The checkpoint's reference log-probabilities cover the held-out set too, so a resume needs it unchanged as well.
    state = session.start(model, optimizer, steps, data_fingerprint([*train_examples, *eval_examples]))
    if state is not None:
        if "reference_log_probs" not in state:
            raise UsageError(f"{session.checkpoint_path}: no reference log-probabilities in this checkpoint")
        reference, eval_reference = (processes.put(state[key]) for key in ("reference_log_probs",
                                                                           "eval_reference_log_probs"))

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, eval_examples, eval_reference, micro_size, pad, config.loss, config.beta,
                            config.label_smoothing, config.rpo_alpha, config.simpo_gamma)

    def accumulate(indices: Sequence[int]) -> BatchGradient:
        # 4-5. Collate the batch's micro-batches, compute each one's share of the DPO loss, accumulate gradients.
        loss, tally, real_tokens = accumulate_gradients(
            model, [train_examples[index] for index in indices], reference[indices],
            config.gradient_accumulation_steps, pad, config.loss, config.beta, processes.world_size, graphs,
            config.label_smoothing, config.rpo_alpha, config.simpo_gamma)
        return BatchGradient(loss, real_tokens, tally=tally)

    def checkpoint_extra(step: int) -> dict:
        # With the reference log-probabilities: an exact resume without recomputing them.
        return {"data_order": order.state(step), "reference_log_probs": reference,
                "eval_reference_log_probs": eval_reference}

    # The starting point at step 0: every implicit margin is 0 (but SimPO's), logp_accuracy the reference's.
    step, last = train_offline(session, model, optimizer, order, steps, config, "losses/dpo", accumulate,
                               held_out if evaluating else None, checkpoint_extra)
    model = session.finish(model, tokenizer, step)
    return Run(session.run_dir, "dpo", config, last, step, model, tokenizer)
