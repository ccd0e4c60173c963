"""Which KL estimator, in which placement, has an unbiased gradient: computed exactly on an enumerable policy.

See advantage.objectives.kl and docs/math.md. The expected gradient of one sample's KL term is a finite sum over
actions, so every claim below is an identity checked to machine precision, not a statistical statement.
"""

import pytest
import torch

from advantage import exact
from advantage.objectives import kl_loss_term, kl_reward_penalty

UNBIASED = {("k1", "reward"), ("k2", "loss"), ("k1", "loss_weighted"), ("k3", "loss_weighted")}


def policies(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("placement", ["reward", "loss", "loss_weighted"])
def test_expected_gradient_against_exact_kl_gradient(seed, estimator, placement):
    logits, ref_logits = policies(seed)
    expected = exact.expected_kl_gradient(logits, ref_logits, estimator, placement)
    error = exact.relative_error(expected, exact.exact_kl_gradient(logits, ref_logits))
    if (estimator, placement) in UNBIASED:
        assert error < 1e-10
    else:
        assert error > 1e-2


@pytest.mark.parametrize("seed", range(5))
def test_k3_in_the_loss_descends_the_reverse_kl(seed):
    """GRPO's k3 in the loss: E[grad k3] = grad KL(pi_ref || pi), the reverse direction."""
    logits, ref_logits = policies(seed)
    expected = exact.expected_kl_gradient(logits, ref_logits, "k3", "loss")
    torch.testing.assert_close(expected, exact.exact_kl_gradient(logits, ref_logits, reverse=True))


@pytest.mark.parametrize("seed", range(5))
def test_k1_in_the_loss_has_zero_expected_gradient(seed):
    """E_pi[grad log pi] = 0: the pathwise gradient of k1 carries no signal at all."""
    logits, ref_logits = policies(seed)
    expected = exact.expected_kl_gradient(logits, ref_logits, "k1", "loss")
    torch.testing.assert_close(expected, torch.zeros_like(expected))


def test_reward_placement_is_detached_and_loss_placement_is_not():
    log_probs = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)
    assert not kl_reward_penalty(log_probs, ref, 0.1).requires_grad
    assert kl_loss_term(log_probs, ref, 0.1).requires_grad
