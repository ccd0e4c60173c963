"""Padding may hold anything (-inf log-probabilities, NaN, huge values): it must never reach a real output or a
gradient. Also the dtype and broadcasting edge cases a review found."""

import math

import pytest
import torch

from advantage.objectives import (
    aggregate,
    clipped_surrogate_loss,
    cpi_loss,
    discounted_returns,
    explained_variance,
    gae,
    grpo_loss,
    importance_sampling_estimate,
    masked_mean,
    n_step_advantage,
    shift_to_next,
    total_return,
)
from advantage.objectives.rlhf import terminal_at_last_token

D = torch.float64
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=D)


def garbage_like(x, value):
    return torch.where(MASK.bool(), x, torch.full_like(x, value))


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_returns_ignore_any_padding(junk):
    g = torch.Generator().manual_seed(0)
    rewards, values, next_values = (torch.randn(3, 5, generator=g, dtype=D) for _ in range(3))
    term = terminal_at_last_token(MASK)
    clean = [fn(rewards, values, next_values) for fn in (
        lambda r, v, nv: gae(r, v, nv, 0.9, 0.8, term, mask=MASK, dim=1),
        lambda r, v, nv: n_step_advantage(r, v, nv, 0.9, 2, term, mask=MASK, dim=1),
        lambda r, v, nv: discounted_returns(r, 0.9, term, None, nv, MASK, dim=1))]
    dirty_inputs = [garbage_like(x, junk) for x in (rewards, values, next_values)]
    dirty = [fn(*dirty_inputs) for fn in (
        lambda r, v, nv: gae(r, v, nv, 0.9, 0.8, term, mask=MASK, dim=1),
        lambda r, v, nv: n_step_advantage(r, v, nv, 0.9, 2, term, mask=MASK, dim=1),
        lambda r, v, nv: discounted_returns(r, 0.9, term, None, nv, MASK, dim=1))]
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)
        assert bool(torch.isfinite(b).all())
        assert bool((b[MASK == 0] == 0).all())


@pytest.mark.parametrize("junk", [-float("inf"), float("nan"), -200.0, 200.0])
def test_losses_and_gradients_ignore_any_padding(junk):
    g = torch.Generator().manual_seed(1)
    log_probs = -torch.rand(3, 5, generator=g, dtype=D)
    old = log_probs + 0.1 * torch.randn(3, 5, generator=g, dtype=D)
    ref = log_probs + 0.1 * torch.randn(3, 5, generator=g, dtype=D)
    advantages = torch.tensor([0.0, 1.0, -1.0], dtype=D)  # an all-zero row: GRPO's "everyone scored the same"
    per_token = advantages[:, None].expand(3, 5)

    def losses(lp, o, r):
        return [clipped_surrogate_loss(lp, o, per_token, 0.2, MASK)[0], cpi_loss(lp, o, per_token, MASK),
                grpo_loss(lp, o, advantages, MASK, beta=0.1, ref_log_probs=r)[0],
                grpo_loss(lp, o, advantages, MASK, beta=0.1, ref_log_probs=r, kl_placement="loss")[0]]

    for index in range(4):
        clean_lp = log_probs.clone().requires_grad_(True)
        dirty_lp = garbage_like(log_probs, junk).requires_grad_(True)
        clean = losses(clean_lp, old, ref)[index]
        dirty = losses(dirty_lp, garbage_like(old, junk), garbage_like(ref, junk))[index]
        torch.testing.assert_close(clean, dirty)
        clean.backward()
        dirty.backward()
        assert bool(torch.isfinite(dirty_lp.grad).all())
        torch.testing.assert_close(clean_lp.grad, dirty_lp.grad)


def test_masked_reductions_ignore_nan_padding():
    x = garbage_like(torch.ones(3, 5, dtype=D), float("nan"))
    assert float(masked_mean(x, MASK)) == 1.0
    assert float(aggregate(x, MASK, "sequence")) == 1.0


def test_language_model_gae_does_not_bootstrap_from_pad_tokens():
    """With the completion's end terminal, a value head's output at pad tokens cannot change any advantage."""
    rewards = torch.zeros(3, 5, dtype=D)
    rewards[:, 2] = 1.0
    values = torch.rand(3, 5, generator=torch.Generator().manual_seed(2), dtype=D)
    pad_value_5 = garbage_like(values, 5.0)
    term = terminal_at_last_token(MASK)
    a = gae(rewards, values, shift_to_next(values, dim=1), 1.0, 0.95, term, mask=MASK, dim=1)
    b = gae(rewards, pad_value_5, shift_to_next(pad_value_5, dim=1), 1.0, 0.95, term, mask=MASK, dim=1)
    torch.testing.assert_close(a, b)
    assert terminal_at_last_token(torch.zeros(1, 3)).sum() == 0  # an empty row has no end


def test_integer_rewards_are_promoted_not_truncated():
    rewards = torch.tensor([[1, 1, 1]])
    torch.testing.assert_close(discounted_returns(rewards, 0.5, dim=1), torch.tensor([[1.75, 1.5, 1.0]]))
    torch.testing.assert_close(total_return(rewards, 0.5, dim=1), torch.tensor([1.75]))
    values = torch.zeros(1, 3)
    torch.testing.assert_close(gae(rewards, values, values, 0.5, 1.0, dim=1), torch.tensor([[1.75, 1.5, 1.0]]))


def test_importance_sampling_of_a_vector_valued_function():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(6, 3, generator=g, dtype=D)
    lp, lq = torch.randn(6, generator=g, dtype=D), torch.randn(6, generator=g, dtype=D)
    expected = (f * (lp - lq).exp()[:, None]).mean(0)
    torch.testing.assert_close(importance_sampling_estimate(f, lp, lq), expected)


def test_explained_variance_of_constant_targets_is_nan():
    assert math.isnan(float(explained_variance(torch.randn(5), torch.ones(5))))
