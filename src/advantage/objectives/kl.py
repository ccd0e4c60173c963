"""KL divergence: exact forms, the sample estimators k1, k2, k3, entropy, and where an estimator is placed.

The notes (docs/math.md §4): D_KL(P || Q) = sum_x P(x) log(P(x) / Q(x)), "the information lost when Q approximates P".

Sample estimators of KL(pi || pi_ref) from a ~ pi, with r = pi_ref(a) / pi(a) (the notes' GRPO uses k3,
docs/math.md §4):

    k1 = -log r                 unbiased, can be negative, high variance
    k2 = 1/2 (log r)^2          biased (exact to second order), never negative
    k3 = (r - 1) - log r        unbiased, never negative (log r <= r - 1), low variance

Placement. The same estimator can enter training in two ways, and they do NOT give the same gradient:

- "reward": the estimate, detached, is subtracted from the reward (RLHF, docs/math.md §4). Its gradient comes
  only through the score function: E[k(a) grad log pi(a)]. For k1 this is exactly grad KL (unbiased);
  k2 and k3 give biased gradients.
- "loss": beta * k(a) is added to the loss and differentiated as it stands (GRPO, docs/math.md §4). Its gradient is
  the pathwise E[grad k(a)] with a held fixed: k1 gives 0 in expectation (useless), k2 gives exactly grad KL
  (unbiased), and k3 gives grad KL(pi_ref || pi), the gradient of the *reverse* KL (biased).
- "loss_weighted": beta * (pi/pi_old) * k(a) in the loss, pi_old = pi at sampling time: the gradient is
  E[k grad log pi + grad k] = grad E[k], unbiased for k1 and k3 (whose expectation is the KL), biased for k2.

`advantage verify` and tests/objectives/test_kl_gradients.py compute these expected gradients exactly on an
enumerable distribution; docs/math.md has the table.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
KLPlacement = Literal["reward", "loss", "loss_weighted"]
KL_PLACEMENTS: tuple[str, ...] = ("reward", "loss", "loss_weighted")


def categorical_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Exact KL(p || q) = sum_a p(a) log(p(a)/q(a)) between categoricals given by logits (docs/math.md §4).

    Shapes: (..., A) -> (...). Written out rather than through torch.distributions: it sits on the hot path of
    PPO-penalty and TRPO, and the formula is the point.
    """
    log_p = torch.log_softmax(logits_p, dim=-1)
    log_q = torch.log_softmax(logits_q, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """Exact KL(p || q) between diagonal Gaussians, summed over the action dimensions.

    Per dimension: log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2. Shapes: (..., D) -> (...).
    """
    variance_ratio = torch.exp(2.0 * (log_std_p - log_std_q))
    mean_term = ((mean_p - mean_q) * torch.exp(-log_std_q)) ** 2
    return (log_std_q - log_std_p + 0.5 * (variance_ratio + mean_term) - 0.5).sum(-1)


def categorical_entropy(logits: Tensor) -> Tensor:
    """H(pi) = -sum_a pi(a) log pi(a). Shapes: (..., A) -> (...)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """Entropy of a diagonal Gaussian, sum_d (1/2 log(2 pi e) + log s_d). Shapes: (..., D) -> (...)."""
    return (0.5 * math.log(2.0 * math.pi * math.e) + log_std).sum(-1)


def kl_k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k1 = -log r = log pi(a) - log pi_ref(a), for a ~ pi. Unbiased for KL(pi || pi_ref); may be negative."""
    return log_probs - ref_log_probs


def kl_k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k2 = 1/2 (log r)^2 = 1/2 (log pi_ref(a) - log pi(a))^2, for a ~ pi. Never negative; biased."""
    return 0.5 * (ref_log_probs - log_probs) ** 2


def kl_k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r, r = pi_ref(a)/pi(a), for a ~ pi (the GRPO KL term, docs/math.md §4).

    The notes write it pi_ref/pi_theta - log(pi_ref/pi_theta) - 1. Unbiased and never negative.
    """
    log_r = ref_log_probs - log_probs
    return torch.expm1(log_r) - log_r


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-sample estimate of KL(pi || pi_ref) with estimator "k1", "k2" or "k3" (elementwise)."""
    if estimator == "k1":
        return kl_k1(log_probs, ref_log_probs)
    if estimator == "k2":
        return kl_k2(log_probs, ref_log_probs)
    if estimator == "k3":
        return kl_k3(log_probs, ref_log_probs)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_reward_penalty(log_probs: Tensor, ref_log_probs: Tensor, beta: float, estimator: KLEstimator = "k1") -> Tensor:
    """Placement "reward": the per-element reward term -beta * k(a), detached (docs/math.md §4).

    The notes write it -beta log(pi/pi_SFT). Unbiased for grad KL(pi || pi_ref) with k1 (the default), when the
    penalty flows through the policy gradient.
    """
    return -beta * kl_estimate(log_probs.detach(), ref_log_probs.detach(), estimator)


def kl_loss_term(log_probs: Tensor, ref_log_probs: Tensor, beta: float, estimator: KLEstimator = "k2",
                 old_log_probs: Tensor | None = None) -> Tensor:
    """Placement "loss" (or "loss_weighted"): the per-element loss term beta * k(a), differentiable in pi.

    Without `old_log_probs` the term is differentiated pathwise ("loss"): unbiased for grad KL with k2 (the
    default); k3 here, as GRPO writes it, descends the reverse KL(pi_ref || pi). With `old_log_probs` (the
    sampling policy's log-probabilities) the term is multiplied by the importance ratio pi/pi_old
    ("loss_weighted"), which restores the score-function part: unbiased with k1 and k3.
    """
    term = beta * kl_estimate(log_probs, ref_log_probs.detach(), estimator)
    if old_log_probs is not None:
        term = term * torch.exp(log_probs - old_log_probs.detach())
    return term
