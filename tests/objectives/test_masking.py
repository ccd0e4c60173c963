"""Tests for advantage.objectives.masking: masked reductions and the three loss aggregation modes,
including the micro-batch property (global denominators make chunk losses sum to the full-batch loss)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.masking import aggregate, masked_mean, masked_sum, masked_var, masked_whiten

F64 = torch.float64
SETTINGS = settings(max_examples=80, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


@st.composite
def padded_batches(draw, min_rows: int = 1):
    """(B, T) float64 values with garbage in the padding, and a right-padding mask (rows may be empty)."""
    B = draw(st.integers(min_rows, 6))
    T = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = torch.zeros(B, T, dtype=F64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1.0
    g = torch.Generator().manual_seed(draw(seeds))
    values = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.where(mask == 1, values, torch.full_like(values, 1e6))
    return values, mask


# ---------------------------------------------------------------------------------------------------------
# masked reductions, by hand
# ---------------------------------------------------------------------------------------------------------

X = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = t64([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_hand():
    # real elements 1, 2, 4
    assert_close(masked_sum(X, M), t64(7.0))
    assert_close(masked_sum(X, M, dim=1), t64([3.0, 4.0]))
    assert_close(masked_sum(X, M, dim=0), t64([5.0, 2.0, 0.0]))
    assert_close(masked_sum(X), t64(21.0))
    # a broadcast mask (keep column 0 only)
    assert_close(masked_sum(X, t64([1, 0, 0])), t64(5.0))


def test_masked_mean_hand():
    assert_close(masked_mean(X, M), t64(7.0 / 3.0))
    assert_close(masked_mean(X, M, dim=1), t64([1.5, 4.0]))
    # column 2 has no real element: 0, not NaN
    assert_close(masked_mean(X, M, dim=0), t64([2.5, 2.0, 0.0]))
    assert_close(masked_mean(X), t64(3.5))
    # boolean masks work like 0/1 masks
    assert_close(masked_mean(X, M.to(torch.bool)), t64(7.0 / 3.0))


def test_masked_mean_empty_row_is_zero_not_nan():
    values = t64([[1.0, 2.0], [float(1e6), 3.0]])
    mask = t64([[1, 1], [0, 0]])
    out = masked_mean(values, mask, dim=1)
    assert not torch.isnan(out).any()
    assert_close(out, t64([1.5, 0.0]))
    everything_padded = masked_mean(values, torch.zeros_like(mask))
    assert not torch.isnan(everything_padded)
    assert_close(everything_padded, t64(0.0))


def test_masked_var_hand():
    values = t64([1.0, 2.0, 3.0, 100.0])
    mask = t64([1, 1, 1, 0])
    # mean 2 ; squared deviations 1, 0, 1 -> population 2/3, Bessel 2/2 = 1
    assert_close(masked_var(values, mask), t64(2.0 / 3.0))
    assert_close(masked_var(values, mask, unbiased=True), t64(1.0))


def test_masked_whiten_hand():
    values = t64([1.0, 2.0, 3.0, 100.0])
    mask = t64([1, 1, 1, 0])
    s = (2.0 / 3.0) ** 0.5
    assert_close(masked_whiten(values, mask, eps=0.0), t64([-1.0 / s, 0.0, 1.0 / s, 0.0]))
    # shift_mean=False only rescales: x / std
    assert_close(masked_whiten(values, mask, eps=0.0, shift_mean=False), t64([1.0 / s, 2.0 / s, 3.0 / s, 0.0]))
    # unbiased std is 1: (x - 2) / 1
    assert_close(masked_whiten(values, mask, eps=0.0, unbiased=True), t64([-1.0, 0.0, 1.0, 0.0]))


@SETTINGS
@given(padded_batches())
def test_masked_reductions_match_selecting_real_elements(batch):
    values, mask = batch
    real = values[mask == 1]
    assert_close(masked_sum(values, mask), real.sum())
    if real.numel() > 0:
        assert_close(masked_mean(values, mask), real.mean())
        assert_close(masked_var(values, mask), real.var(unbiased=False))
    for b in range(values.shape[0]):
        row = values[b][mask[b] == 1]
        expected = row.mean() if row.numel() else t64(0.0)
        assert_close(masked_mean(values, mask, dim=1)[b], expected)
    assert not torch.isnan(masked_mean(values, mask, dim=1)).any()


# ---------------------------------------------------------------------------------------------------------
# aggregate: the three modes by hand
# ---------------------------------------------------------------------------------------------------------

class TestAggregateHand:
    def test_token(self):
        # real elements 1, 2, 4: (1 + 2 + 4) / 3
        assert_close(aggregate(X, M, "token"), t64(7.0 / 3.0))
        # a global token count of 10: 7 / 10
        assert_close(aggregate(X, M, "token", num_tokens=10), t64(0.7))

    def test_sequence(self):
        # row means: (1 + 2)/2 = 1.5 and 4/1 = 4 ; mean over 2 sequences = 2.75
        assert_close(aggregate(X, M, "sequence"), t64(2.75))
        # over a global 4 sequences: 5.5 / 4
        assert_close(aggregate(X, M, "sequence", num_sequences=4), t64(1.375))

    def test_constant(self):
        # sum 7 / (2 sequences x L): L = 4 -> 0.875 ; L = 1 -> 3.5 (the seeds' 1/N sum_n sum_t)
        assert_close(aggregate(X, M, "constant", constant_length=4), t64(0.875))
        assert_close(aggregate(X, M, "constant", constant_length=1), t64(3.5))
        assert_close(aggregate(X, M, "constant", constant_length=1, num_sequences=7), t64(1.0))

    def test_no_mask(self):
        # token: 21/6 ; sequence: (2 + 5)/2 ; constant L=3: 21/6
        assert_close(aggregate(X, None, "token"), t64(3.5))
        assert_close(aggregate(X, None, "sequence"), t64(3.5))
        assert_close(aggregate(X, None, "constant", constant_length=3), t64(3.5))
        # they differ once sequences have different lengths (see the masked cases above)

    def test_empty_sequence_counts_as_zero(self):
        mask = t64([[1, 1, 0], [0, 0, 0]])
        # sequence: (1.5 + 0) / 2 ; token: 3 / 2 ; no NaN anywhere
        assert_close(aggregate(X, mask, "sequence"), t64(0.75))
        assert_close(aggregate(X, mask, "token"), t64(1.5))
        assert_close(aggregate(X, torch.zeros_like(mask), "token"), t64(0.0))

    def test_errors(self):
        with pytest.raises(ValueError):
            aggregate(X, M, "constant")
        with pytest.raises(ValueError):
            aggregate(X, M, "constant", constant_length=0)
        with pytest.raises(ValueError):
            aggregate(X, M, "bogus")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            aggregate(X.reshape(-1), None, "sequence")

    def test_token_mode_any_shape(self):
        x = X.reshape(2, 3, 1).expand(2, 3, 2)
        m = M.reshape(2, 3, 1).expand(2, 3, 2)
        assert_close(aggregate(x, m, "token"), t64(7.0 / 3.0))


@SETTINGS
@given(padded_batches(), st.sampled_from(["token", "sequence", "constant"]), st.sampled_from([1.0, 3.0, 8.0]))
def test_aggregate_matches_loops(batch, mode, length):
    values, mask = batch
    B, T = values.shape
    if mode == "token":
        count = sum(float(mask[b, t]) for b in range(B) for t in range(T))
        total = sum(float(values[b, t]) for b in range(B) for t in range(T) if mask[b, t] == 1)
        expected = total / count if count else 0.0
    elif mode == "sequence":
        per_row = []
        for b in range(B):
            row = [float(values[b, t]) for t in range(T) if mask[b, t] == 1]
            per_row.append(sum(row) / len(row) if row else 0.0)
        expected = sum(per_row) / B
    else:
        total = sum(float(values[b, t]) for b in range(B) for t in range(T) if mask[b, t] == 1)
        expected = total / (B * length)
    assert_close(aggregate(values, mask, mode, constant_length=length), t64(expected))


# ---------------------------------------------------------------------------------------------------------
# micro-batches: chunk losses with global denominators sum to the full-batch loss (and gradient)
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(padded_batches(min_rows=2), st.data(), st.sampled_from(["token", "sequence", "constant"]))
def test_micro_batches_sum_to_full_batch(batch, data, mode):
    values, mask = batch
    B = values.shape[0]
    split = data.draw(st.integers(1, B - 1))
    values = values.clone().requires_grad_(True)
    kwargs = dict(constant_length=5.0) if mode == "constant" else {}
    full = aggregate(values, mask, mode, **kwargs)
    (full_grad,) = torch.autograd.grad(full, values)

    if mode == "token":
        globals_ = dict(num_tokens=mask.sum().clamp(min=1.0))
    else:
        globals_ = dict(num_sequences=B)
    chunks = [(values[:split], mask[:split]), (values[split:], mask[split:])]
    summed = sum(aggregate(v, m, mode, **kwargs, **globals_) for v, m in chunks)
    (summed_grad,) = torch.autograd.grad(summed, values)
    assert_close(summed, full)
    assert_close(summed_grad, full_grad)


def test_micro_batches_without_global_counts_differ():
    # The reason for num_tokens: per-chunk token means averaged are not the full-batch token mean.
    values = t64([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = t64([[1, 1, 1], [1, 0, 0]])
    full = aggregate(values, mask, "token")  # 16 / 4 = 4
    local = aggregate(values[:1], mask[:1], "token") + aggregate(values[1:], mask[1:], "token")  # 2 + 10
    assert_close(full, t64(4.0))
    assert_close(local, t64(12.0))
    glob = sum(aggregate(values[i:i + 1], mask[i:i + 1], "token", num_tokens=4) for i in range(2))
    assert_close(glob, t64(4.0))
