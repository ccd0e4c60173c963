"""Importance sampling and the surrogates built on it: L^CPI, PPO-clip, PPO-penalty with its adaptive beta.

The notes derive importance sampling (docs/math.md §3), E_{x~p}[f(x)] = E_{x~q}[f(x) p(x)/q(x)], which lets data
collected by the old policy pi_old (theta') be reused to improve pi_theta. They warn that only the mean is
preserved, not the variance; TRPO and PPO keep pi_theta close to pi_old so that the weights stay near 1.

One of the notes writes the PPO objective with "grad P_theta / P_theta'" inside the sum. That is the *gradient* of the
surrogate r_t(theta) A_t, with r_t(theta) = P_theta / P_theta': the code minimises -r_t A_t, whose gradient is
-grad P_theta / P_theta' * A_t. See docs/math.md, §3 and resolution 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from advantage.objectives.masking import Aggregation, aggregate, fill_padding, masked_mean


def importance_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """r_t(theta) = pi_theta(a_t|s_t) / pi_old(a_t|s_t), from log-probabilities (L^CPI, docs/math.md §3).

    Computed as exp(log pi_theta - log pi_old); `old_log_probs` is treated as data. Padded elements (mask 0) get
    ratio 1 with zero gradient, so that padding holding -inf or large values cannot overflow into NaN.
    """
    return torch.exp(fill_padding(log_probs - old_log_probs.detach(), mask))


def importance_sampling_estimate(f_values: Tensor, target_log_probs: Tensor, behaviour_log_probs: Tensor) -> Tensor:
    """E_{x~p}[f(x)] estimated from samples x ~ q: mean of f(x) p(x)/q(x) (docs/math.md §3).

    Args:
        f_values: f(x_i) for samples x_i drawn from the behaviour distribution q, shape (N, ...).
        target_log_probs: log p(x_i), shape (N,) (aligned with axis 0 of f_values) or f_values' own shape.
        behaviour_log_probs: log q(x_i).
    Returns:
        The unbiased estimate, reduced over the sample axis 0.
    """
    weights = torch.exp(target_log_probs - behaviour_log_probs)
    if weights.dim() < f_values.dim():  # (N,) weights for (N, D) values: align them with the sample axis
        weights = weights.reshape(weights.shape + (1,) * (f_values.dim() - weights.dim()))
    return (f_values * weights).mean(dim=0)


def cpi_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor | None = None,
             aggregation: Aggregation = "token", constant_length: float | None = None) -> Tensor:
    """Minus the conservative-policy-iteration surrogate, -L^CPI = -E_t[r_t(theta) A_t] (TRPO's objective,
    docs/math.md §3).

    At theta = theta_old its gradient equals the policy gradient with psi = A; away from it, it is the
    importance-sampled estimate of J(theta) - J(theta_old) under the old state distribution (docs/math.md §3).
    """
    ratio = importance_ratio(log_probs, old_log_probs, mask)
    return -aggregate(ratio * advantages.detach(), mask, aggregation, constant_length)


def clipped_surrogate_terms(ratio: Tensor, advantages: Tensor, clip_low: float,
                            clip_high: float | None = None) -> Tensor:
    """Per-element PPO-clip loss, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (L^CLIP, docs/math.md §3).

    `clip_high` defaults to `clip_low` (the symmetric clip of the seeds); a larger upper bound is the
    "clip-higher" variant. Where the clipped branch is the minimum the term is constant in theta, so it
    has zero gradient: the update gets no incentive to move r further outside [1 - eps, 1 + eps].
    """
    if clip_low < 0 or (clip_high is not None and clip_high < 0):
        raise ValueError("clip ranges must be >= 0")
    clip_high = clip_low if clip_high is None else clip_high
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped)


@dataclass(frozen=True)
class SurrogateStats:
    """Diagnostics of a surrogate evaluation (detached scalars).

    clip_fraction: share of real elements where the clipped branch was active.
    approx_kl: k3 estimate of KL(pi_old || pi_theta) on the batch, mean((r - 1) - log r).
    ratio_mean: mean importance ratio.
    """

    clip_fraction: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


def surrogate_stats(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_low: float,
                    clip_high: float | None = None, mask: Tensor | None = None) -> SurrogateStats:
    """Clip fraction, approximate KL and mean ratio for logging (the fixed set of diagnostics every algorithm logs)."""
    with torch.no_grad():
        clip_high = clip_low if clip_high is None else clip_high
        log_ratio = fill_padding(log_probs - old_log_probs, mask)
        ratio = log_ratio.exp()
        # The clipped branch is active (constant) where r A > clip(r) A, i.e. r left [1-eps_low, 1+eps_high] on the
        # side the advantage pushes it: one comparison instead of four.
        clipped = ratio * advantages > ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
        return SurrogateStats(
            clip_fraction=masked_mean(clipped.to(ratio.dtype), mask),
            approx_kl=masked_mean((ratio - 1.0) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )


def clipped_surrogate_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float,
                           mask: Tensor | None = None, clip_range_high: float | None = None,
                           aggregation: Aggregation = "token",
                           constant_length: float | None = None,
                           num_tokens: float | Tensor | None = None) -> tuple[Tensor, SurrogateStats]:
    """PPO-clip loss, -L^CLIP = -E_t[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)] (docs/math.md §3).

    `num_tokens`: the real elements of the whole batch when this is one micro-batch of it (see `aggregate`).
    Returns the scalar loss and its SurrogateStats.
    """
    ratio = importance_ratio(log_probs, old_log_probs, mask)
    terms = clipped_surrogate_terms(ratio, fill_padding(advantages, mask), clip_range, clip_range_high)
    loss = aggregate(terms, mask, aggregation, constant_length, num_tokens)
    return loss, surrogate_stats(log_probs, old_log_probs, advantages, clip_range, clip_range_high, mask)


def kl_penalty_surrogate_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, kl: Tensor,
                              beta: float, mask: Tensor | None = None) -> Tensor:
    """PPO-penalty loss, -E_t[r_t A_t] + beta * KL (the notes' Loss_kl and J^theta'(theta) - beta KL, docs/math.md §3).

    Args:
        kl: per-element KL between the old and the new policy at s_t, differentiable in theta (the classic
            algorithm passes the exact categorical or Gaussian KL(pi_old(.|s) || pi_theta(.|s)), as in the
            PPO paper; a sampled estimator from advantage.objectives.kl also works).
        beta: penalty coefficient, adapted between updates by `adaptive_kl_beta`.
    """
    ratio = importance_ratio(log_probs, old_log_probs, mask)
    return -masked_mean(ratio * advantages.detach(), mask) + beta * masked_mean(kl, mask)


def adaptive_kl_beta(beta: float, measured_kl: float, target_kl: float, tolerance: float = 1.5,
                     factor: float = 2.0) -> float:
    """The adaptive KL coefficient of PPO-penalty (the "1.5x rule", docs/math.md §3).

        KL < target / 1.5  ->  beta / 2   (policies too close: weigh improvement more)
        KL > target * 1.5  ->  beta * 2   (policies too far: weigh the constraint more)
        otherwise          ->  beta

    The notes' text reads "less than 1.5 times the target halves beta, more than 1.5 times doubles it"; taken
    literally beta would never stay put and would be halved even at 1.2x the target, so the code follows the PPO
    paper the notes summarise: d < d_targ / 1.5 halves (docs/math.md, resolution 2).
    """
    if target_kl <= 0:
        raise ValueError(f"target_kl must be > 0, got {target_kl}")
    if measured_kl < target_kl / tolerance:
        return beta / factor
    if measured_kl > target_kl * tolerance:
        return beta * factor
    return beta
