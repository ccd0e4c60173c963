"""GRPO (docs/math.md §6): the group mean as the baseline, PPO's clipped ratio per token, and a k3 KL to the reference.

    J_GRPO(theta) = E_{q, {o_i} ~ pi_old} 1/G sum_i 1/|o_i| sum_t { min(r_it A_it, clip(r_it, 1-eps, 1+eps) A_it)
                                                              - beta D_KL[pi_theta || pi_ref] }
    A_it = (r_i - mean(r)) / std(r)          (the same for every token t of answer i)
    D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1    (k3, per token)

The seed's 1/|o_i| averages each answer over its own length, so a token of a short answer weighs more than a
token of a long one; `aggregation` makes that a choice (see advantage.objectives.masking.aggregate).

Beyond the notes (docs/math.md §6b), GSPO replaces the per-token ratio r_it by one ratio per answer, the geometric
mean of its tokens' ratios, s_i = (pi_theta(o_i|q) / pi_old(o_i|q))^(1/|o_i|), clipped as a whole
(`sequence_importance_ratio`; `grpo_loss(importance_ratio_level="sequence")`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from advantage.objectives.kl import KLEstimator, kl_estimate, kl_loss_term, kl_reward_penalty
from advantage.objectives.masking import Aggregation, aggregate, fill_padding, masked_mean, masked_sum
from advantage.objectives.ppo import SurrogateStats, clipped_surrogate_terms, importance_ratio, surrogate_stats

# Which baseline b_i each answer's reward is compared with: its group's mean (the seed's) or the mean of the
# other G - 1 answers' rewards (RLOO's leave-one-out, docs/math.md §6b).
Baseline = Literal["group_mean", "leave_one_out"]
BASELINES: tuple[str, ...] = ("group_mean", "leave_one_out")


def leave_one_out_baseline(grouped_rewards: Tensor) -> Tensor:
    """b_i = 1/(G-1) sum_{j != i} r_j, the mean reward of the other answers to the same prompt (docs/math.md §6b).

    The group mean counts r_i itself, so it depends on the answer o_i it is a baseline for, and
    E[(r_i - mean r) grad log pi(o_i)] = (1 - 1/G) grad J: the seed's baseline shrinks the policy gradient by
    (G-1)/G. b_i is independent of o_i (the answers are drawn independently), so E[b_i grad log pi(o_i)] = 0 and
    r_i - b_i gives grad J itself (RLOO, Ahmadian et al., 2024). This holds where the advantage multiplies the whole
    answer's grad log pi(o_i); dividing by the group's std or by |o_i| (both depend on o_i) breaks it for either
    baseline. Since r_i - b_i = G/(G-1) (r_i - mean r) for every sample, the two baselines differ by that factor only.

    Shapes: (num_groups, G) -> (num_groups, G), G >= 2.
    """
    group_size = grouped_rewards.shape[-1]
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs groups of at least 2 answers")
    return (grouped_rewards.sum(dim=-1, keepdim=True) - grouped_rewards) / (group_size - 1)


def group_normalized_advantages(rewards: Tensor, group_size: int | None = None, eps: float = 1e-4,
                                unbiased: bool = False, scale_by_std: bool = True,
                                baseline: Baseline = "group_mean") -> Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group of answers to one prompt (docs/math.md §6).

    Args:
        rewards: (num_groups, G), or flat (num_groups * G,) with `group_size` = G (consecutive answers share
            a prompt).
        eps: keeps groups whose answers all scored the same at advantage 0 instead of 0/0.
        unbiased: divide the variance by G - 1 instead of G (the seed writes std(r) without saying which).
        scale_by_std: False keeps only the mean baseline, (r - mean(r)) ("Dr. GRPO").
        baseline: "leave_one_out" puts `leave_one_out_baseline` in place of mean(r) (RLOO, docs/math.md §6b):
            the advantages times G/(G-1); the std, when it scales, is still the whole group's.
    Returns:
        Advantages shaped like `rewards`.
    """
    flat = rewards.dim() == 1
    if flat:
        if group_size is None or group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"flat rewards of length {rewards.numel()} need a group_size dividing it")
        grouped = rewards.reshape(-1, group_size)
    else:
        grouped = rewards
    if unbiased and grouped.shape[-1] < 2:
        raise ValueError("an unbiased std needs groups of at least 2 answers")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    centred = grouped - (grouped.mean(dim=-1, keepdim=True) if baseline == "group_mean"
                         else leave_one_out_baseline(grouped))
    if scale_by_std:
        centred = centred / (grouped.std(dim=-1, keepdim=True, correction=1 if unbiased else 0) + eps)
    return centred.reshape(rewards.shape)


# Whose ratio the clip bounds: each token's (the seed's) or each answer's (GSPO's).
RatioLevel = Literal["token", "sequence"]
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")


def sequence_importance_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's ratio of each answer, s_i = (pi_theta(o_i|q) / pi_old(o_i|q))^(1/|o_i|)
    = exp(1/|o_i| sum_t [log pi_theta(o_it) - log pi_old(o_it)]) (docs/math.md §6b).

    The geometric mean of the answer's per-token ratios: its length no longer scales the log-ratio, so one clip
    range suits answers of every length. Its gradient at pi_theta = pi_old is 1/|o_i| sum_t grad log pi_theta(o_it).

    Shapes: (B, T), (B, T), (B, T) mask -> (B,). An answer with no token gets ratio 1.
    """
    return torch.exp(_sequence_log_ratio(log_probs, old_log_probs, mask))


def _sequence_log_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> Tensor:
    """log s_i = 1/|o_i| sum_t [log pi_theta(o_it) - log pi_old(o_it)], (B,) (`sequence_importance_ratio`'s log)."""
    log_ratio = masked_sum(fill_padding(log_probs - old_log_probs.detach(), mask), mask, dim=-1)
    return log_ratio / mask.sum(dim=-1).clamp(min=1).to(log_ratio.dtype)


def grpo_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2,
              clip_range_high: float | None = None, beta: float = 0.0, ref_log_probs: Tensor | None = None,
              kl_estimator: KLEstimator = "k3", kl_placement: Literal["loss", "loss_weighted"] = "loss_weighted",
              aggregation: Aggregation = "sequence",
              constant_length: float | None = None, num_tokens: float | Tensor | None = None,
              num_sequences: float | Tensor | None = None, importance_ratio_level: RatioLevel = "token",
              ) -> tuple[Tensor, SurrogateStats, Tensor]:
    """Minus J_GRPO for a batch of answers (docs/math.md §6), per token then aggregated.

    Args:
        log_probs: (B, T) log pi_theta of the answer tokens (differentiable).
        old_log_probs: (B, T) log pi_old at generation time.
        advantages: (B,) group-normalised advantage per answer, or (B, T) per token.
        mask: (B, T), 1 on answer tokens.
        clip_range, clip_range_high: epsilon of the clip (symmetric unless clip_range_high is given).
        beta: KL coefficient; 0 disables the KL term (no reference model needed).
        ref_log_probs: (B, T) log pi_ref, required when beta > 0.
        kl_estimator: the notes use "k3" (docs/math.md §4); see advantage.objectives.kl for what each estimator's
            gradient does in the loss.
        kl_placement: "loss_weighted" (default) multiplies the per-token KL term by the ratio pi/pi_old, which
            makes its gradient the unbiased grad KL(pi || pi_ref) for k3 (and k1); "loss" differentiates the
            term as the seed writes it, which for k3 descends the reverse KL(pi_ref || pi) instead. The logged
            value is the same k3 either way (docs/math.md, "KL placement").
        aggregation: "sequence" (the seed's 1/G sum_i 1/|o_i| sum_t), "token" (all tokens of the batch equal),
            or "constant" (sum divided by G * constant_length).
        num_tokens, num_sequences: global counts for exact aggregation over micro-batches and processes.
        importance_ratio_level: "token" (the seed's r_it) or "sequence" (GSPO's s_i, the same for every token of
            answer i, docs/math.md §6b). With "sequence" the KL term's weighting stays per token.
    Returns:
        (scalar loss, SurrogateStats of the ratio used, mean per-token KL over real tokens (detached; 0 if
        beta = 0)).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)
    # Padding may hold anything (-inf log-probabilities included): replace it before any exp.
    log_probs = fill_padding(log_probs, mask)
    old_log_probs = fill_padding(old_log_probs, mask)
    advantages = fill_padding(advantages, mask)
    if ref_log_probs is not None:
        ref_log_probs = fill_padding(ref_log_probs, mask)
    if importance_ratio_level == "sequence":
        ratio = sequence_importance_ratio(log_probs, old_log_probs, mask).unsqueeze(-1).expand_as(log_probs)
    elif importance_ratio_level == "token":
        ratio = importance_ratio(log_probs, old_log_probs)
    else:
        raise ValueError(f"importance_ratio_level must be 'token' or 'sequence', got {importance_ratio_level!r}")
    terms = clipped_surrogate_terms(ratio, advantages, clip_range, clip_range_high)
    mean_kl = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    if kl_placement not in ("loss", "loss_weighted"):
        raise ValueError(f"kl_placement must be 'loss' or 'loss_weighted', got {kl_placement!r}")
    if beta > 0:
        if ref_log_probs is None:
            raise ValueError("beta > 0 needs ref_log_probs")
        weighting = old_log_probs if kl_placement == "loss_weighted" else None
        terms = terms + kl_loss_term(log_probs, ref_log_probs, beta, kl_estimator, old_log_probs=weighting)
        with torch.no_grad():
            mean_kl = masked_mean(kl_estimate(log_probs, ref_log_probs, kl_estimator), mask)
    loss = aggregate(terms, mask, aggregation, constant_length, num_tokens, num_sequences)
    # The statistics of the ratio used: log r = log pi_theta - log pi_old per token, or log s_i on each of its tokens.
    if importance_ratio_level == "sequence":
        log_ratio = _sequence_log_ratio(log_probs.detach(), old_log_probs, mask).unsqueeze(-1).expand_as(log_probs)
        stats = surrogate_stats(log_ratio, torch.zeros_like(log_ratio), advantages, clip_range, clip_range_high, mask)
    else:
        stats = surrogate_stats(log_probs, old_log_probs, advantages, clip_range, clip_range_high, mask)
    return loss, stats, mean_kl


def answer_kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor, beta: float,
                      estimator: KLEstimator = "k1") -> Tensor:
    """The KL as a term of each answer's reward (placement "reward"): -beta sum_t k(a_t) over the answer's tokens.

    The detached per-token `kl.kl_reward_penalty` summed over each answer, to be added to r_i before the group
    normalisation (docs/math.md §4, "KL placement"; with k1 the policy gradient is unbiased for grad KL).

    Args:
        log_probs: (N, T) log pi_old(a_t | s_t) of each answer's tokens (the sampling policy).
        ref_log_probs: (N, T) the same under the frozen reference.
        mask: (N, T), 1 on answer tokens.
    Returns:
        (N,) one penalty per answer, detached.
    """
    return masked_sum(kl_reward_penalty(log_probs, ref_log_probs, beta, estimator), mask, dim=-1)
