"""Returns and advantages: R(tau), reward-to-go, n-step returns, the TD residual and GAE(gamma, lambda).

Layout. Every function reduces along one *time axis* `dim`:
- time-major rollouts from vectorised environments are (T, N) with ``dim=0`` (the default);
- language-model token rewards are (B, T) with ``dim=1`` (docs/math.md §5: state = prefix, action = next token).
Any further dimensions are carried along.

Episode ends. `terminated` and `truncated` are separate boolean tensors shaped like `rewards`:
- ``terminated[t]``: s_{t+1} is terminal, its value is 0, nothing is bootstrapped;
- ``truncated[t]``: the episode was cut (time limit, end of the rollout) but s_{t+1} is not terminal, so
  the return bootstraps from ``next_values[t]`` = V(s_{t+1}), the value of the *final* observation
  (with Gymnasium's autoreset that is the observation returned in ``info["final_obs"]``, not the reset one).
The last real step of every row is always an episode boundary for the recursion: if it is neither
terminated nor truncated it bootstraps from ``next_values`` there (a rollout cut mid-episode).

`next_values[t]` is V(s_{t+1}) for every t. Passing it explicitly (rather than values shifted by one) is
what makes truncation exact: at a truncated step it is the value of the final observation.

Padding. `mask` marks real steps (1) and padding (0). Padding may come after a row's real steps (right padding,
as in batches of generated completions) or right after an episode end (the reset step of Gymnasium's NEXT_STEP
autoreset); it never leaks into real outputs, whatever it holds (NaN and inf included). Padded outputs are 0.

Language models (dim=1): the last real token of a completion ends the episode, so pass
`terminated=advantage.objectives.rlhf.terminal_at_last_token(mask)`; otherwise it is treated as a cut and
bootstraps from `next_values` there, which for a value head shifted by one is its output at a pad token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from advantage.objectives.masking import fill_padding


def _to_time_major(x: Tensor | None, dim: int) -> Tensor | None:
    return None if x is None else x.movedim(dim, 0)


def _flags(flag: Tensor | None, like: Tensor) -> Tensor:
    if flag is None:
        return torch.zeros_like(like, dtype=torch.bool)
    return flag.to(torch.bool).expand_as(like)


def _last_real_step(mask: Tensor | None, like: Tensor) -> Tensor:
    """Boolean (T, ...) that is True at the last real step of each row (time-major)."""
    if mask is None:
        last = torch.zeros_like(like, dtype=torch.bool)
        last[-1] = True
        return last
    real = mask.to(torch.bool).expand_as(like)
    # Number of real steps strictly after t: reverse cumulative sum, shifted by one.
    after = real.flip(0).to(torch.int64).cumsum(0).flip(0) - real.to(torch.int64)
    return real & (after == 0)


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return fill_padding(x, mask)


def _floating(x: Tensor, *others: Tensor | None) -> Tensor:
    """`x` in a floating dtype that can hold every input (integer rewards are promoted, never truncated)."""
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    for other in others:
        if other is not None and other.is_floating_point():
            dtype = torch.promote_types(dtype, other.dtype)
    return x.to(dtype)


def total_return(rewards: Tensor, gamma: float = 1.0, mask: Tensor | None = None, dim: int = 0) -> Tensor:
    """Return of whole trajectories, R(tau) = sum_t gamma^t r_t (docs/math.md §1; the notes' "E[R(tau)]").

    Args:
        rewards: rewards with the time axis at `dim`, one trajectory per row, e.g. (T, N) or (B, T).
        gamma: discount; 1.0 gives the notes' plain sum (docs/math.md §1).
        mask: 1 for real steps; padding contributes nothing.
    Returns:
        `rewards` with the time axis reduced, e.g. (N,) or (B,).
    """
    r = _masked(_floating(rewards).movedim(dim, 0), None if mask is None else mask.movedim(dim, 0))
    steps = torch.arange(r.shape[0], device=r.device, dtype=r.dtype)
    discounts = (gamma ** steps).reshape((-1,) + (1,) * (r.dim() - 1))
    return (discounts * r).sum(0)


def discounted_returns(rewards: Tensor, gamma: float, terminated: Tensor | None = None,
                       truncated: Tensor | None = None, next_values: Tensor | None = None,
                       mask: Tensor | None = None, dim: int = 0) -> Tensor:
    """Discounted reward-to-go, G_t = sum_{t'>=t} gamma^(t'-t) r_t' within the episode (docs/math.md §1, psi_2).

    Recursively, G_t = r_t + gamma * G_{t+1}, except at an episode boundary:
    terminated_t -> G_t = r_t;  truncated_t or last real step -> G_t = r_t + gamma * next_values_t.
    With `next_values=None` nothing is bootstrapped (complete Monte Carlo episodes).

    Shapes: all inputs like `rewards`, time axis at `dim`. Returns a tensor like `rewards`.
    """
    r = _floating(rewards, next_values).movedim(dim, 0)
    m = _to_time_major(mask, dim)
    term = _flags(_to_time_major(terminated, dim), r)
    cut = _flags(_to_time_major(truncated, dim), r) | _last_real_step(m, r)
    nv = torch.zeros_like(r) if next_values is None else _masked(next_values.movedim(dim, 0).to(r.dtype), m)
    r = _masked(r, m)
    out = torch.empty_like(r)
    future = torch.zeros_like(r[0])
    for t in range(r.shape[0] - 1, -1, -1):
        following = torch.where(cut[t], nv[t], future)
        future = r[t] + gamma * torch.where(term[t], torch.zeros_like(following), following)
        out[t] = future
    return _masked(out, m).movedim(0, dim)


def episode_return_per_step(rewards: Tensor, gamma: float, terminated: Tensor | None = None,
                            truncated: Tensor | None = None, mask: Tensor | None = None, dim: int = 0) -> Tensor:
    """psi_1 (docs/math.md §1): every step of an episode gets the episode's whole return sum_{t'=0}^T gamma^t' r_t'.

    The return is counted from the episode's first step inside the given rollout; rows may hold several
    episodes one after another (separated by `terminated` / `truncated`). Nothing is bootstrapped.
    """
    g = discounted_returns(rewards, gamma, terminated, truncated, None, mask, dim).movedim(dim, 0)
    ends = _flags(_to_time_major(terminated, dim), g) | _flags(_to_time_major(truncated, dim), g)
    out = torch.empty_like(g)
    current = g[0]
    out[0] = current
    for t in range(1, g.shape[0]):
        current = torch.where(ends[t - 1], g[t], current)
        out[t] = current
    return _masked(out, _to_time_major(mask, dim)).movedim(0, dim)


def td_residual(rewards: Tensor, values: Tensor, next_values: Tensor, gamma: float,
                terminated: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """TD residual delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), with V(s_{t+1}) = 0 when terminated_t.

    docs/math.md §2: the notes' delta_t^V, and psi_6 ("时序差分残差"). Elementwise, so any layout works.
    Truncation needs nothing special here: `next_values` already holds V(final observation).
    """
    rewards = _floating(rewards, values, next_values)
    term = _flags(terminated, rewards)
    bootstrap = torch.where(term, torch.zeros_like(next_values), next_values)
    delta = _masked(rewards, mask) + gamma * _masked(bootstrap, mask) - _masked(values, mask)
    return _masked(delta, mask)


def n_step_advantage(rewards: Tensor, values: Tensor, next_values: Tensor, gamma: float, n: int,
                     terminated: Tensor | None = None, truncated: Tensor | None = None,
                     mask: Tensor | None = None, dim: int = 0) -> Tensor:
    """n-step advantage A^n_t = sum_{k=0}^{n-1} gamma^k delta_{t+k} (the notes' A^1, A^2, A^3, ...; docs/math.md §2).

    Equivalently sum_{k<n} gamma^k r_{t+k} + gamma^n V(s_{t+n}) - V(s_t): the sum telescopes. The sum
    stops at the episode's end (terminated: no bootstrap; truncated or last real step: bootstrap from
    next_values there). n=1 gives delta_t; n >= T gives the Monte Carlo advantage G_t - V(s_t).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    r = _floating(rewards, values, next_values).movedim(dim, 0)
    m = _to_time_major(mask, dim)
    term = _flags(_to_time_major(terminated, dim), r)
    end = term | _flags(_to_time_major(truncated, dim), r) | _last_real_step(m, r)
    delta = td_residual(r, values.movedim(dim, 0), next_values.movedim(dim, 0), gamma, term, m)
    horizon = r.shape[0]
    total = torch.zeros_like(delta)
    alive = torch.ones_like(delta)  # 1 while t+k is still in the episode of t
    for k in range(min(n, horizon)):
        shifted_delta = torch.zeros_like(delta)
        shifted_delta[: horizon - k] = delta[k:]
        total = total + torch.where(alive > 0, (gamma ** k) * shifted_delta, torch.zeros_like(shifted_delta))
        shifted_end = torch.ones_like(alive)
        shifted_end[: horizon - k] = end[k:].to(alive.dtype)
        alive = alive * (1.0 - shifted_end)
    return _masked(total, m).movedim(0, dim)


def n_step_returns(rewards: Tensor, values: Tensor, next_values: Tensor, gamma: float, n: int,
                   terminated: Tensor | None = None, truncated: Tensor | None = None,
                   mask: Tensor | None = None, dim: int = 0) -> Tensor:
    """n-step return G^(n)_t = sum_{k<n} gamma^k r_{t+k} + gamma^n V(s_{t+n}), cut at episode ends (docs/math.md §2).

    Equal to n_step_advantage + V(s_t); the target of an n-step critic.
    """
    advantage = n_step_advantage(rewards, values, next_values, gamma, n, terminated, truncated, mask, dim)
    return _masked(advantage + values, mask)


def gae(rewards: Tensor, values: Tensor, next_values: Tensor, gamma: float, gae_lambda: float,
        terminated: Tensor | None = None, truncated: Tensor | None = None,
        mask: Tensor | None = None, dim: int = 0, with_returns: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Generalised advantage estimation, A^GAE_t = sum_{l>=0} (gamma*lambda)^l delta_{t+l} (docs/math.md §2).

    The notes derive it (docs/math.md §2) as the lambda-weighted mix (1-lambda)(A^1 + lambda A^2 + lambda^2 A^3 + ...)
    of the n-step advantages and sums the geometric series. Computed by the recursion
    A_t = delta_t + gamma*lambda*(1 - end_t) * A_{t+1}, where end_t = terminated or truncated or last real step;
    truncation still bootstraps inside delta_t through next_values.

    lambda=0 gives delta_t (one-step TD, low variance, biased by V); lambda=1 gives G_t - V(s_t) (Monte Carlo).
    The critic's regression target is the lambda-return G^lambda_t = A^GAE_t + V(s_t): with `with_returns` it is
    returned too, as (advantages, returns).

    Shapes: all like `rewards` with the time axis at `dim`; returns the advantages in the same shape (padding 0).
    """
    r = _floating(rewards, values, next_values).movedim(dim, 0)
    m = _to_time_major(mask, dim)
    term = _flags(_to_time_major(terminated, dim), r)
    end = term | _flags(_to_time_major(truncated, dim), r) | _last_real_step(m, r)
    delta = td_residual(r, values.movedim(dim, 0), next_values.movedim(dim, 0), gamma, term, m)
    out = torch.empty_like(delta)
    running = torch.zeros_like(delta[0])
    for t in range(delta.shape[0] - 1, -1, -1):
        # Select rather than multiply by (1 - end): nothing after an episode end may leak in, not even a NaN.
        running = torch.where(end[t], delta[t], delta[t] + gamma * gae_lambda * running)
        out[t] = running
    advantages = _masked(out, m).movedim(0, dim)
    if not with_returns:
        return advantages
    return advantages, _masked(out + values.movedim(dim, 0).to(out.dtype), m).movedim(0, dim)


def shift_to_next(values: Tensor, last: Tensor | float = 0.0, dim: int = 0) -> Tensor:
    """V(s_{t+1}) from V(s_t) along `dim`: drop the first entry and append `last` (the bootstrap value).

    For a rollout this gives `next_values` except at truncated steps, where the caller substitutes the value
    of the final observation. For language-model tokens (`dim=1`) the shifted value at a completion's last token
    is the value head's output at a pad token: mark that token terminated (rlhf.terminal_at_last_token) so it is
    never used.
    """
    v = values.movedim(dim, 0)
    tail = torch.as_tensor(last, dtype=v.dtype, device=v.device).expand_as(v[:1])
    return torch.cat([v[1:], tail], dim=0).movedim(0, dim)
