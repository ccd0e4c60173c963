"""Preferences instead of rewards: reward-model losses (Bradley-Terry, K-wise, Plackett-Luce) and DPO.

The notes (docs/math.md §5) model a preference between two answers with Bradley-Terry,
    P(y_1 > y_2 | x) = exp r(x, y_1) / (exp r(x, y_1) + exp r(x, y_2)) = sigma(r(x, y_1) - r(x, y_2)),
and a full ranking tau of K answers with Plackett-Luce,
    P(tau | y_1..y_K, x) = prod_{k=1}^K exp r(x, y_tau(k)) / sum_{j=k}^K exp r(x, y_tau(j)).
One of them trains InstructGPT's reward model on all C(K, 2) pairs of a K-wise ranking.

DPO (docs/math.md §6) substitutes the reward that the KL-regularised optimum implies,
    r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x),
into these likelihoods; Z(x) cancels in every difference and in every softmax, leaving losses of the policy.
Beyond the notes (docs/math.md §6b), three pairwise losses of the same log-ratio difference are often used in
their place: conservative DPO (label smoothing), IPO (a squared error) and the hinge; RPO adds the chosen answer's
negative log-likelihood to any of them; SimPO drops the reference and compares length-normalised log-likelihoods;
and reward models often add a term that centres their scores.

Rankings are given best first: column 0 is the most preferred answer. Losses are means over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from advantage.objectives.masking import fill_padding, masked_sum


def bradley_terry_probability(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """P(y_w > y_l | x) = sigma(r_w - r_l) under Bradley-Terry (docs/math.md §5)."""
    return torch.sigmoid(chosen_rewards - rejected_rewards)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Reward-model loss -E[log sigma(r(x, y_w) - r(x, y_l))] (docs/math.md §5: L_R, the K-wise loss with K = 2).

    Shapes: (B,), (B,) -> scalar. Uses logsigmoid for stability at large margins.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def _pairs_of_rankings(ranked_rewards: Tensor, mask: Tensor | None) -> Tensor:
    """(B, K, K) bool: True at (i, j) for every pair i < j of a ranking whose two answers exist."""
    k = ranked_rewards.shape[-1]
    if k < 2:
        raise ValueError("a ranking needs at least 2 answers")
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=ranked_rewards.device), diagonal=1)
    pairs = upper.expand(*ranked_rewards.shape, k)
    if mask is not None:
        present = mask.to(torch.bool)
        pairs = pairs & present.unsqueeze(-1) & present.unsqueeze(-2)
    return pairs


def kwise_pairwise_loss(ranked_rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """InstructGPT's K-wise loss, -1/C(K,2) E[sum_{i<j} log sigma(r_i - r_j)] over every pair of a ranking
    (docs/math.md §5).

    Args:
        ranked_rewards: (B, K) reward-model scores, column 0 the best answer.
        mask: optional (B, K), 1 where an answer exists (rankings of different lengths, padded at the end);
            each ranking is averaged over its own C(K_b, 2) pairs.
    Returns:
        Scalar; for K = 2 exactly `bradley_terry_loss`.
    """
    margins = ranked_rewards.unsqueeze(-1) - ranked_rewards.unsqueeze(-2)  # (B, K, K): r_i - r_j
    pair_mask = _pairs_of_rankings(ranked_rewards, mask)
    per_ranking = -masked_sum(F.logsigmoid(margins), pair_mask, dim=(-1, -2)) \
        / pair_mask.sum((-1, -2)).to(ranked_rewards.dtype).clamp(min=1.0)
    return per_ranking.mean()


def reward_centering_loss(ranked_rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """The auxiliary loss that keeps a reward model's scores near 0, mean_b 1/C(K,2) sum_{i<j} (r_i + r_j)^2
    (docs/math.md §6b); for a pair, (r_w + r_l)^2 (Eisenstein et al., 2023; TRL's center_rewards_coefficient).

    Every preference loss depends only on differences of rewards to the same prompt, so it leaves the reward's level
    free (a constant per prompt); this term pins it near 0, which keeps the scores of a later RL stage on one scale.
    Its gradient is 2 (r_i + r_j) on each reward of a pair: it moves the level, never the ranking's differences.

    Args:
        ranked_rewards: (B, K) reward-model scores.
        mask: optional (B, K), 1 where an answer exists; each ranking is averaged over its own pairs.
    Returns:
        Scalar (multiply by the coefficient).
    """
    sums = ranked_rewards.unsqueeze(-1) + ranked_rewards.unsqueeze(-2)  # (B, K, K): r_i + r_j
    pair_mask = _pairs_of_rankings(ranked_rewards, mask)
    per_ranking = masked_sum(fill_padding(sums, pair_mask) ** 2, pair_mask, dim=(-1, -2)) \
        / pair_mask.sum((-1, -2)).to(ranked_rewards.dtype).clamp(min=1.0)
    return per_ranking.mean()


def plackett_luce_log_likelihood(ranked_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """log P(tau) = sum_k [ s_k - log sum_{j>=k} exp s_j ] for scores listed in ranked order (docs/math.md §5).

    Args:
        ranked_scores: (B, K), column 0 ranked first.
        mask: optional (B, K), 1 where an answer exists; absent answers (padded at the end) take no part.
    Returns:
        (B,) log-likelihoods of the rankings.
    """
    if mask is not None:
        present = mask.to(torch.bool)
        scores = ranked_scores.masked_fill(~present, float("-inf"))
    else:
        present = torch.ones_like(ranked_scores, dtype=torch.bool)
        scores = ranked_scores
    # log sum_{j>=k} exp s_j for every k: a reversed cumulative log-sum-exp.
    tail_logsumexp = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    terms = torch.where(present, ranked_scores - tail_logsumexp, torch.zeros_like(ranked_scores))
    return terms.sum(-1)


def plackett_luce_loss(ranked_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Negative Plackett-Luce log-likelihood of full rankings, -E[log P(tau)] (docs/math.md §5).

    K = 2 is Bradley-Terry.
    """
    return -plackett_luce_log_likelihood(ranked_scores, mask).mean()


def dpo_implicit_rewards(policy_log_probs: Tensor, ref_log_probs: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward beta * log(pi_theta(y|x) / pi_ref(y|x)) (docs/math.md §6), up to beta log Z(x).

    Inputs are sequence log-probabilities log pi(y|x) = sum_t log pi(y_t | x, y_<t); any shape.
    """
    return beta * (policy_log_probs - ref_log_probs.detach())


@dataclass(frozen=True)
class PreferenceStats:
    """Diagnostics of a DPO batch (detached).

    chosen_rewards, rejected_rewards: (B,) implicit rewards of the preferred / dispreferred answers.
    margins: (B,) chosen minus rejected.
    accuracy: share of pairs whose margin is positive.
    """

    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracy: Tensor


def _pair_stats(chosen: Tensor, rejected: Tensor) -> PreferenceStats:
    """The detached diagnostics of B pairs of implicit rewards."""
    with torch.no_grad():
        margins = chosen - rejected
        return PreferenceStats(chosen.detach(), rejected.detach(), margins, (margins > 0).to(margins.dtype).mean())


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo_loss(policy_chosen_log_probs: Tensor, policy_rejected_log_probs: Tensor, ref_chosen_log_probs: Tensor,
             ref_rejected_log_probs: Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[Tensor, PreferenceStats]:
    """Pairwise DPO, -E[log sigma(beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x))]
    (docs/math.md §6).

    With label_smoothing eps > 0 (conservative DPO, docs/math.md §6b) each label is taken as wrong with
    probability eps: L = -E[(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)], Delta the difference of
    the two log-ratios. Its optimum is sigma(beta Delta) = (1 - eps) p + eps (1 - p), p the share of the data that
    prefers y_w, so deterministic preferences (p = 1) no longer push Delta to infinity.

    Shapes: four (B,) sequence log-probabilities -> scalar loss and PreferenceStats.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen = dpo_implicit_rewards(policy_chosen_log_probs, ref_chosen_log_probs, beta)
    rejected = dpo_implicit_rewards(policy_rejected_log_probs, ref_rejected_log_probs, beta)
    loss = bradley_terry_loss(chosen, rejected)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * bradley_terry_loss(rejected, chosen)
    return loss, _pair_stats(chosen, rejected)


def ipo_loss(policy_chosen_log_probs: Tensor, policy_rejected_log_probs: Tensor, ref_chosen_log_probs: Tensor,
             ref_rejected_log_probs: Tensor, beta: float) -> tuple[Tensor, PreferenceStats]:
    """IPO (identity preference optimisation, docs/math.md §6b): E[(Delta - 1 / (2 beta))^2], with Delta =
    log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x).

    A squared error instead of DPO's log-sigmoid: when a pair is preferred with probability p the optimum is
    Delta = (p - 1/2) / beta, finite even for p = 1, where DPO's optimum Delta is infinite. beta plays the role of
    IPO's tau. log pi is the sequence log-probability, as in DPO (no division by the answer's length). The stats
    are those of DPO (implicit rewards beta h).

    Shapes: four (B,) sequence log-probabilities -> scalar loss and PreferenceStats.
    """
    _check_beta(beta)
    chosen = dpo_implicit_rewards(policy_chosen_log_probs, ref_chosen_log_probs, beta)
    rejected = dpo_implicit_rewards(policy_rejected_log_probs, ref_rejected_log_probs, beta)
    log_ratio_difference = ((policy_chosen_log_probs - ref_chosen_log_probs.detach())
                            - (policy_rejected_log_probs - ref_rejected_log_probs.detach()))
    loss = ((log_ratio_difference - 1 / (2 * beta)) ** 2).mean()
    return loss, _pair_stats(chosen, rejected)


def hinge_dpo_loss(policy_chosen_log_probs: Tensor, policy_rejected_log_probs: Tensor, ref_chosen_log_probs: Tensor,
                   ref_rejected_log_probs: Tensor, beta: float) -> tuple[Tensor, PreferenceStats]:
    """The hinge loss on DPO's implicit margin (SLiC's calibration loss, docs/math.md §6b): E[max(0, 1 - beta Delta)],
    with Delta the difference of the two log-ratios.

    A pair stops contributing once its implicit margin beta Delta reaches 1.

    Shapes: four (B,) sequence log-probabilities -> scalar loss and PreferenceStats.
    """
    _check_beta(beta)
    chosen = dpo_implicit_rewards(policy_chosen_log_probs, ref_chosen_log_probs, beta)
    rejected = dpo_implicit_rewards(policy_rejected_log_probs, ref_rejected_log_probs, beta)
    loss = torch.relu(1 - (chosen - rejected)).mean()
    return loss, _pair_stats(chosen, rejected)


def simpo_loss(policy_chosen_log_probs: Tensor, policy_rejected_log_probs: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, beta: float, gamma: float = 0.5) -> tuple[Tensor, PreferenceStats]:
    """SimPO (docs/math.md §6b): Bradley-Terry on the length-normalised log-likelihood, with a target margin gamma,
    L = -E[log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)].

    No reference model: the implicit reward is beta/|y| log pi(y|x), the answer's mean log-probability per token,
    so an answer's length does not buy reward. With u = beta/|a| log pi(a) - beta/|b| log pi(b) for two answers a, b
    and a preferred with probability p, the expected loss p softplus(gamma - u) + (1 - p) softplus(gamma + u) is least
    where p sigma(gamma - u) = (1 - p) sigma(gamma + u); at gamma = 0, sigma(u) = p. The margin gamma counts for
    whichever answer won, so it pushes u further out than that, the more so the surer the label.

    Shapes: (B,) sequence log-probabilities and (B,) token counts (>= 1) -> scalar loss and PreferenceStats of the
    implicit rewards.
    """
    _check_beta(beta)
    chosen = beta * policy_chosen_log_probs / chosen_lengths.clamp(min=1).to(policy_chosen_log_probs.dtype)
    rejected = beta * policy_rejected_log_probs / rejected_lengths.clamp(min=1).to(policy_rejected_log_probs.dtype)
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, _pair_stats(chosen, rejected)


def chosen_nll_loss(policy_chosen_log_probs: Tensor, chosen_lengths: Tensor) -> Tensor:
    """RPO's term (docs/math.md §6b): the negative log-likelihood of the preferred answer per token,
    L_NLL = -E_b[log pi_theta(y_w|x) / |y_w|], added to a DPO loss as L_DPO + alpha L_NLL.

    DPO only widens the gap between the two answers, and it often does so by lowering both log-likelihoods; this
    term keeps raising the preferred one. Dividing by each answer's length (not by the batch's tokens) makes it a
    mean over pairs like the DPO losses, so that micro-batches weigh their pairs exactly as the whole batch does.

    Shapes: (B,) sequence log-probabilities, (B,) token counts (>= 1) -> scalar.
    """
    return -(policy_chosen_log_probs / chosen_lengths.clamp(min=1).to(policy_chosen_log_probs.dtype)).mean()


def plackett_luce_dpo_loss(policy_log_probs: Tensor, ref_log_probs: Tensor, beta: float,
                           mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Listwise DPO, -E[log prod_k exp(beta h_tau(k)) / sum_{j>=k} exp(beta h_tau(j))], h = log pi/pi_ref
    (docs/math.md §6).

    Args:
        policy_log_probs, ref_log_probs: (B, K) sequence log-probabilities, column 0 the best answer.
        mask: optional (B, K) for rankings of different lengths.
    Returns:
        (scalar loss, (B, K) implicit rewards). For K = 2 the loss is exactly `dpo_loss`.
    """
    _check_beta(beta)
    rewards = dpo_implicit_rewards(policy_log_probs, ref_log_probs, beta)
    return plackett_luce_loss(rewards, mask), rewards.detach()
