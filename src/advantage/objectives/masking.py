"""Masked reductions shared by every step- and token-level loss.

A *mask* is 1 (or True) where an element is real data and 0 where it is padding: the steps after an
episode ended in a padded rollout, or the pad tokens of a batch of language-model sequences. Every
function here treats `mask=None` as "all real".

Loss normalisation is a choice with consequences (the peers are often ambiguous about it), so it is
made explicit by `aggregate`:

- ``"token"``: sum over every real element of the batch divided by the number of real elements.
  Every token (or step) weighs the same; long sequences dominate.
- ``"sequence"``: average each sequence over its own real elements, then average the sequences.
  Every sequence weighs the same; this is GRPO's 1/|o_i| (docs/math.md §6).
- ``"constant"``: sum over every real element divided by (number of sequences x a constant length).
  With ``constant_length=1`` this is the notes' REINFORCE estimator 1/N sum_n sum_t (docs/math.md §1);
  with the maximum generation length it is the "Dr. GRPO" normaliser.

For the "token" and "constant" modes the denominator can be given from outside (``num_tokens``,
``num_sequences``), so that a batch split into micro-batches or over processes sums to exactly the
same gradient as the whole batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token", "sequence", "constant"]
AGGREGATIONS: tuple[str, ...] = ("token", "sequence", "constant")


def _as_float_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(like)
    return mask.to(dtype=like.dtype).expand_as(like)


def fill_padding(values: Tensor, mask: Tensor | None, fill: float = 0.0) -> Tensor:
    """`values` with every padded element replaced by `fill` (no-op without a mask).

    Selecting, not multiplying: 0 * inf and 0 * NaN are NaN, and padding may hold anything (log 0 = -inf for
    padded log-probabilities, garbage from a value head at pad tokens). The gradient at padded elements is 0.
    """
    if mask is None:
        return values
    return torch.where(mask.to(torch.bool).expand_as(values), values, torch.full_like(values, fill))


def masked_sum(values: Tensor, mask: Tensor | None = None, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of `values` over the real elements: sum(values * mask).

    Args:
        values: any shape.
        mask: broadcastable to `values`; 1 for real data, 0 for padding. None means all real.
        dim: dimension(s) to reduce; None reduces everything to a scalar.
    """
    product = fill_padding(values, mask)
    return product.sum() if dim is None else product.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor | None = None, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of `values` over the real elements: sum(values * mask) / sum(mask).

    A slice with no real element gives 0 rather than NaN (the numerator is 0 there too).
    """
    if mask is None:  # the common unpadded case, in as few tensor operations as possible (hot path of PPO)
        return values.mean() if dim is None else values.mean(dim=dim)
    m = _as_float_mask(mask, values)
    kept = fill_padding(values, mask)
    total = kept.sum() if dim is None else kept.sum(dim=dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return total / count.clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor | None = None, unbiased: bool = False) -> Tensor:
    """Variance of the real elements of `values` (all dimensions reduced).

    ``unbiased=True`` divides by (n - 1) (Bessel's correction), otherwise by n.
    """
    if mask is None:
        return values.var(correction=1 if unbiased else 0) if values.numel() > 1 else torch.zeros_like(values.sum())
    m = _as_float_mask(mask, values)
    mean = masked_mean(values, m)
    count = m.sum()
    squared = fill_padding((values - mean) ** 2, mask).sum()
    denominator = (count - 1.0) if unbiased else count
    return squared / denominator.clamp(min=1.0)


def masked_whiten(values: Tensor, mask: Tensor | None = None, eps: float = 1e-8, shift_mean: bool = True,
                  unbiased: bool = False) -> Tensor:
    """Standardise the real elements: (x - mean) / (std + eps); padded elements come back as 0.

    ``shift_mean=False`` only rescales (keeps the sign of every element), as some RLHF
    implementations do for rewards.
    """
    if mask is None:
        std = values.std(correction=1 if unbiased else 0) if values.numel() > 1 else torch.zeros_like(values.sum())
        return ((values - values.mean()) if shift_mean else values) / (std + eps)
    m = _as_float_mask(mask, values)
    mean = masked_mean(values, m)
    std = masked_var(values, m, unbiased=unbiased).sqrt()
    centred = values - mean if shift_mean else values
    return fill_padding(centred / (std + eps), mask)


def aggregate(values: Tensor, mask: Tensor | None = None, mode: Aggregation = "token",
              constant_length: float | None = None, num_tokens: float | Tensor | None = None,
              num_sequences: float | Tensor | None = None) -> Tensor:
    """Reduce a (B, T) tensor of per-token (per-step) terms to a scalar loss; see the module docstring.

    Args:
        values: (B, T) per-element loss terms; sequence b's elements lie along dim 1 (batch-major: transpose a
            time-major (T, N) rollout first). Mode "token" accepts any shape (it does not need the time axis).
        mask: (B, T); 1 for real elements.
        mode: "token" | "sequence" | "constant".
        constant_length: the constant L of mode "constant" (required there).
        num_tokens: global count of real elements, for mode "token" when `values` is one micro-batch of a
            larger batch. Defaults to this batch's count.
        num_sequences: global number of sequences, for modes "sequence" and "constant" on a micro-batch.
            Defaults to B.

    Returns:
        A scalar:
        token:     sum_{b,t} m x / num_tokens
        sequence:  sum_b [ sum_t m x / sum_t m ] / num_sequences
        constant:  sum_{b,t} m x / (num_sequences * constant_length)
    """
    if mask is None and mode == "token" and num_tokens is None:
        return values.mean()
    m = _as_float_mask(mask, values)
    values = fill_padding(values, mask)
    if mode != "token" and values.dim() != 2:
        raise ValueError(f"aggregation mode {mode!r} expects values of shape (B, T), got {tuple(values.shape)}")
    if num_sequences is None:
        num_sequences = values.shape[0]
    if mode == "token":
        if num_tokens is None:
            num_tokens = m.sum().clamp(min=1.0)
        return values.sum() / num_tokens
    if mode == "sequence":
        per_sequence = values.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return per_sequence.sum() / num_sequences
    if mode == "constant":
        if constant_length is None or constant_length <= 0:
            raise ValueError("aggregation mode 'constant' needs a positive constant_length")
        return values.sum() / (num_sequences * constant_length)
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATIONS}")
