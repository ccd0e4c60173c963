"""The policy-gradient estimator, its six weightings psi, advantage normalisation and the critic's losses.

One of the notes writes the policy-gradient theorem as one template (docs/math.md §1),

    g = E[ sum_{t=0}^T psi_t * grad log pi_theta(a_t | s_t) ],

with six interchangeable choices of psi_t (all unbiased, with very different variance):

    1. "total_return"           sum_{t'=0}^T gamma^t' r_t'            whole-trajectory return (docs/math.md §1)
    2. "reward_to_go"           sum_{t'=t}^T gamma^(t'-t) r_t'        return after a_t (docs/math.md §1)
    3. "reward_to_go_baseline"  sum_{t'=t}^T gamma^(t'-t) r_t' - b(s_t)   with a baseline (docs/math.md §1)
    4. "q_value"                Q^pi(s_t, a_t)
    5. "advantage"              A^pi(s_t, a_t) = Q^pi(s_t, a_t) - V^pi(s_t)
    6. "td_residual"            r_t + gamma V^pi(s_{t+1}) - V^pi(s_t)

A note on gamma (resolved in docs/math.md): with gamma < 1, forms 2-6 estimate the gradient of the
*undiscounted* state weighting; they are unbiased for the discounted objective J_gamma only with an
extra gamma^t factor. With gamma = 1 (finite horizon) all six are unbiased; `advantage verify` shows it.

The loss is the surrogate whose gradient is the estimator: -psi_t * log pi(a_t|s_t) with psi held constant.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from advantage.objectives.masking import Aggregation, aggregate, fill_padding, masked_mean, masked_var, masked_whiten
from advantage.objectives.returns import discounted_returns, episode_return_per_step, td_residual

PsiForm = Literal["total_return", "reward_to_go", "reward_to_go_baseline", "q_value", "advantage", "td_residual"]
PSI_FORMS: tuple[str, ...] = ("total_return", "reward_to_go", "reward_to_go_baseline", "q_value", "advantage",
                              "td_residual")


def psi(form: PsiForm, rewards: Tensor, gamma: float, *, terminated: Tensor | None = None,
        truncated: Tensor | None = None, values: Tensor | None = None, next_values: Tensor | None = None,
        q_values: Tensor | None = None, baseline: Tensor | None = None, mask: Tensor | None = None,
        dim: int = 0) -> Tensor:
    """The weight psi_t of the policy-gradient template (docs/math.md §1), for one of its six forms (module docstring).

    Args:
        form: which psi (see PSI_FORMS).
        rewards: r_t with the time axis at `dim`.
        gamma: discount.
        terminated, truncated: episode ends (see advantage.objectives.returns).
        values: V(s_t), needed by "advantage" and "td_residual".
        next_values: V(s_{t+1}), needed by "td_residual"; for "reward_to_go*" optional bootstrap at cuts.
        q_values: Q(s_t, a_t), needed by "q_value" and "advantage".
        baseline: b(s_t) like `rewards`, needed by "reward_to_go_baseline" (a learned V(s_t), or a mean).
        mask: 1 for real steps.
    Returns:
        psi_t shaped like `rewards`, detached: it is a weight, never differentiated.
    """
    def need(name: str, value: Tensor | None) -> Tensor:
        if value is None:
            raise ValueError(f"psi form {form!r} needs `{name}`")
        return value

    if form == "total_return":
        weight = episode_return_per_step(rewards, gamma, terminated, truncated, mask, dim)
    elif form == "reward_to_go":
        weight = discounted_returns(rewards, gamma, terminated, truncated, next_values, mask, dim)
    elif form == "reward_to_go_baseline":
        weight = discounted_returns(rewards, gamma, terminated, truncated, next_values, mask, dim)
        weight = weight - need("baseline", baseline)
    elif form == "q_value":
        weight = need("q_values", q_values)
    elif form == "advantage":
        weight = need("q_values", q_values) - need("values", values)
    elif form == "td_residual":
        weight = td_residual(rewards, need("values", values), need("next_values", next_values), gamma, terminated)
    else:
        raise ValueError(f"unknown psi form {form!r}; expected one of {PSI_FORMS}")
    return fill_padding(weight, mask).detach()


def policy_gradient_loss(log_probs: Tensor, psi_values: Tensor, mask: Tensor | None = None,
                         aggregation: Aggregation = "token", constant_length: float | None = None) -> Tensor:
    """REINFORCE surrogate, loss = -(1/N) sum_n sum_t psi_t log pi_theta(a_t|s_t) (the notes' "loss", docs/math.md §1).

    Its gradient is minus the seeds' estimator sum_t psi_t grad log pi(a_t|s_t), averaged as `aggregation`
    says: "token" averages over steps; "constant" with constant_length=1 is exactly the seeds' 1/N sum_n sum_t
    with rows = trajectories (shape (N, T)); "sequence" averages per trajectory first.

    Args:
        log_probs: log pi_theta(a_t|s_t), differentiable; (N, T) for "sequence"/"constant", any shape for "token".
        psi_values: weights like `log_probs` (detached here in any case).
        mask: 1 for real steps.
    """
    return -aggregate(psi_values.detach() * log_probs, mask, aggregation, constant_length)


def normalize_advantages(advantages: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Advantage normalisation, (A - mean(A)) / (std(A) + eps) over the real elements of the batch.

    Subtracting the batch mean is a (slightly data-dependent) baseline, the notes' "b ~ E[R]" (docs/math.md §1);
    dividing by the std fixes the step size's scale. Padded elements come back 0.
    """
    return masked_whiten(advantages.detach(), mask, eps=eps)


def value_loss(values: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Critic regression loss, L(w) = 1/2 (target - V_w(s_t))^2, averaged over real steps (docs/math.md §2).

    With target = r + gamma V(s_{t+1}) this is the notes' critic objective 1/2 (r + gamma V(s') - V(s))^2; the
    target is held constant (semi-gradient), which gives their gradient -(r + gamma V(s') - V(s)) grad V(s).
    """
    return 0.5 * masked_mean((values - targets.detach()) ** 2, mask)


def clipped_value_loss(values: Tensor, old_values: Tensor, targets: Tensor, clip_range: float,
                       mask: Tensor | None = None, num_tokens: float | Tensor | None = None) -> Tensor:
    """PPO's clipped critic loss, 1/2 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2).

    The notes say that in practice the critic "may add clip tricks" (docs/math.md §2): the new value may not move
    further than `clip_range` from the value at collection time, unless that makes the error smaller. With `num_tokens`
    the sum over real elements is divided by it (a micro-batch's share of the whole batch's mean).
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    targets = targets.detach()
    old_values = old_values.detach()
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    worst = torch.maximum((values - targets) ** 2, (clipped - targets) ** 2)
    if num_tokens is not None:
        return 0.5 * fill_padding(worst, mask).sum() / num_tokens
    return 0.5 * masked_mean(worst, mask)


def explained_variance(predictions: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - Var[target - prediction] / Var[target]: 1 is a perfect critic, 0 no better than a constant.

    NaN when the targets do not vary (the ratio is undefined), as CleanRL and SB3 report it.
    """
    target_var = masked_var(targets, mask)
    residual_var = masked_var(targets - predictions, mask)
    if float(target_var) == 0.0:
        return torch.full_like(target_var, float("nan"))
    return 1.0 - residual_var / target_var
