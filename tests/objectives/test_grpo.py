"""Group-normalised advantages (RLOO's leave-one-out baseline too), the GRPO loss and GSPO's sequence ratio
(advantage.objectives.grpo)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.grpo import (
    answer_kl_penalty,
    group_normalized_advantages,
    grpo_loss,
    leave_one_out_baseline,
    sequence_importance_ratio,
)
from advantage.objectives.kl import kl_k3

D = torch.float64
HYP = settings(max_examples=50, deadline=None)
MODES = ("sequence", "token", "constant")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


# --------------------------------------------------------------------------------------------------------------------
# group-normalised advantages
# --------------------------------------------------------------------------------------------------------------------

def test_leave_one_out_baseline_hand_values():
    # rewards (1, 0, 0, 1): b = (1/3, 2/3, 2/3, 1/3), so r - b = (2/3, -2/3, -2/3, 2/3) = 4/3 (r - mean r)
    rewards = t([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    assert_close(leave_one_out_baseline(rewards), t([[1 / 3, 2 / 3, 2 / 3, 1 / 3], [3.0, 3.0, 3.0, 3.0]]))
    centred = group_normalized_advantages(rewards, scale_by_std=False, baseline="leave_one_out")
    assert_close(centred, t([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(centred, 4 / 3 * group_normalized_advantages(rewards, scale_by_std=False))
    # with the std: the same division by the whole group's std; flat rewards with a group size give the same
    scaled = group_normalized_advantages(rewards.reshape(-1), group_size=4, baseline="leave_one_out")
    assert_close(scaled, t([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0]) / (0.5 + 1e-4))  # std of (1,0,0,1)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(t([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="baseline must be one of"):
        group_normalized_advantages(rewards, baseline="median")


@pytest.mark.parametrize("group_size", [2, 3])
def test_the_leave_one_out_baseline_gives_the_exact_policy_gradient_and_the_group_mean_shrinks_it(group_size):
    """On a 3-armed bandit with a softmax policy, the expectation of the group estimator
    1/G sum_i A_i grad log pi(a_i) over every one of the 3^G groups, each weighted by its probability, is exactly
    grad J = grad sum_a pi(a) R(a) with RLOO's baseline, and exactly (G-1)/G grad J with the group mean."""
    logits = t([0.3, -0.5, 0.9]).requires_grad_()
    arm_rewards = t([1.0, -2.0, 0.5])
    policy = torch.softmax(logits, dim=0)
    (exact_gradient,) = torch.autograd.grad((policy * arm_rewards).sum(), logits, retain_graph=True)
    log_policy = torch.log(policy)
    for baseline, scale in (("leave_one_out", 1.0), ("group_mean", (group_size - 1) / group_size)):
        expected = torch.zeros(3, dtype=D)
        for arms in itertools.product(range(3), repeat=group_size):
            index = torch.tensor(arms)
            advantages = group_normalized_advantages(arm_rewards[index][None], scale_by_std=False,
                                                     baseline=baseline)[0]
            surrogate = (advantages.detach() * log_policy[index]).mean()
            (gradient,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
            expected += policy.detach()[index].prod() * gradient
        assert_close(expected, scale * exact_gradient, rtol=1e-12, atol=1e-12)


def test_group_advantages_hand_values():
    # group (1, 2, 3): mean 2, population std sqrt(2/3) = 0.8164966 -> (-1.2247449, 0, 1.2247449)
    # unbiased std 1 -> (-1, 0, 1); scale_by_std=False -> (-1, 0, 1) (centred only)
    # group (0, 0, 1, ...) second row: (5, 5, 5) is constant -> 0
    rewards = t([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    s = math.sqrt(1.5)
    assert_close(group_normalized_advantages(rewards, eps=0.0)[0], t([-s, 0.0, s]))
    assert_close(group_normalized_advantages(rewards, eps=0.0, unbiased=True)[0], t([-1.0, 0.0, 1.0]))
    assert_close(group_normalized_advantages(rewards, scale_by_std=False), t([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    # default eps = 1e-4: (r - mean) / (std + 1e-4)
    assert_close(group_normalized_advantages(rewards)[0], t([-1.0, 0.0, 1.0]) / (math.sqrt(2.0 / 3.0) + 1e-4))
    # constant group: exactly 0, not NaN
    assert torch.equal(group_normalized_advantages(rewards)[1], torch.zeros(3, dtype=D))
    # binary rewards (1, 0, 0, 0): mean 0.25, pop std sqrt(0.1875) = 0.4330127 -> (1.7320508, -0.5773503 x3)
    adv = group_normalized_advantages(t([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    assert_close(adv, t([[math.sqrt(3.0), -1 / math.sqrt(3.0), -1 / math.sqrt(3.0), -1 / math.sqrt(3.0)]]))


@HYP
@given(num_groups=st.integers(1, 6), g=st.integers(2, 10), seed=st.integers(0, 2 ** 31 - 1))
def test_group_advantages_are_standardised_per_group(num_groups, g, seed):
    gen = torch.Generator().manual_seed(seed)
    group_offsets = torch.randn(num_groups, 1, dtype=D, generator=gen)
    rewards = torch.randn(num_groups, g, dtype=D, generator=gen) * 3 + group_offsets
    adv = group_normalized_advantages(rewards, eps=0.0)
    assert_close(adv.mean(-1), torch.zeros(num_groups, dtype=D), atol=1e-12, rtol=0)
    assert_close(adv.std(-1, correction=0), torch.ones(num_groups, dtype=D))
    # with the default eps = 1e-4: (r - mean) / (std + 1e-4), std just below 1
    adv_eps = group_normalized_advantages(rewards)
    pop_std = rewards.std(-1, correction=0, keepdim=True)
    assert_close(adv_eps, (rewards - rewards.mean(-1, keepdim=True)) / (pop_std + 1e-4))
    assert torch.all(adv_eps.std(-1, correction=0) < 1)
    # flat input with group_size equals the 2-D input
    flat = group_normalized_advantages(rewards.reshape(-1), group_size=g)
    assert flat.shape == (num_groups * g,)
    assert_close(flat, adv_eps.reshape(-1))
    # biased vs unbiased: ratio sqrt(G / (G - 1)) (eps = 0)
    unbiased = group_normalized_advantages(rewards, eps=0.0, unbiased=True)
    assert_close(adv, unbiased * math.sqrt(g / (g - 1)))
    # the ordering within a group is kept
    assert torch.equal(adv.argsort(-1), rewards.argsort(-1))


def test_group_advantages_validation():
    with pytest.raises(ValueError):
        group_normalized_advantages(t([1.0, 2.0, 3.0]))  # no group size
    with pytest.raises(ValueError):
        group_normalized_advantages(t([1.0, 2.0, 3.0]), group_size=2)  # does not divide
    with pytest.raises(ValueError):
        group_normalized_advantages(t([[1.0], [2.0]]), unbiased=True)
    # group of one answer: advantage 0
    assert_close(group_normalized_advantages(t([[4.0], [2.0]])), t([[0.0], [0.0]]))


# --------------------------------------------------------------------------------------------------------------------
# GRPO loss
# --------------------------------------------------------------------------------------------------------------------

def batch(seed: int = 0, b: int = 4, length: int = 6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=gen)
    lengths[0] = length
    lengths[1] = 1
    mask = (torch.arange(length).expand(b, length) < lengths.unsqueeze(-1)).to(D)
    log_probs = -torch.rand(b, length, dtype=D, generator=gen) * 3
    adv = torch.randn(b, dtype=D, generator=gen)
    return gen, log_probs, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_loss_on_policy_value_and_gradient(seed):
    _, log_probs, adv, mask = batch(seed)
    b, length = mask.shape
    lengths = mask.sum(1)
    total_tokens = mask.sum()
    # value with ratio 1, beta 0: -aggregate(A_i over the answer's tokens)
    expected_value = {
        "sequence": -(adv * lengths / lengths).sum() / b,  # -1/G sum_i 1/|o_i| sum_t A_i = -mean(A)
        "token": -(adv * lengths).sum() / total_tokens,
        "constant": -(adv * lengths).sum() / (b * length),
    }
    expected_grad = {
        "sequence": -adv.unsqueeze(-1) / (b * lengths.unsqueeze(-1)) * mask,
        "token": -adv.unsqueeze(-1) / total_tokens * mask,
        "constant": -adv.unsqueeze(-1) / (b * length) * mask,
    }
    for mode in MODES:
        lp = log_probs.clone().requires_grad_()
        loss, stats, mean_kl = grpo_loss(lp, log_probs.clone(), adv, mask, aggregation=mode, constant_length=length)
        assert_close(loss, expected_value[mode])
        loss.backward()
        assert_close(lp.grad, expected_grad[mode])
        assert_close(stats.clip_fraction, t(0.0))
        assert_close(stats.ratio_mean, t(1.0))
        assert_close(mean_kl, t(0.0))
    assert_close(expected_value["sequence"], -adv.mean())


def test_grpo_aggregation_weights_long_and_short_answers_differently():
    # answer 0 has 1 token, answer 1 has 3 tokens; on-policy, beta = 0
    mask = t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    lp0 = torch.full((2, 3), -1.0, dtype=D)
    adv = t([1.0, -1.0])
    # sequence: -(1/1 * 1 + 1/3 * (-3)) / 2 = 0; per-token gradient -A_i/(G |o_i|): -1/2 and +1/6
    # token:    -(1 - 3) / 4 = 0.5;          per-token gradient -A_i/4:         -1/4 and +1/4
    # constant (L = 3): -(1 - 3) / (2*3) = 1/3; per-token gradient -A_i/6:    -1/6 and +1/6
    expected = {
        "sequence": (0.0, [[-0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),
        "token": (0.5, [[-0.25, 0, 0], [0.25, 0.25, 0.25]]),
        "constant": (1 / 3, [[-1 / 6, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),
    }
    for mode, (value, grad) in expected.items():
        lp = lp0.clone().requires_grad_()
        loss, _, _ = grpo_loss(lp, lp0, adv, mask, aggregation=mode, constant_length=3)
        assert_close(loss, t(value))
        loss.backward()
        assert_close(lp.grad, t(grad))
    # sequence mode: a token of the short answer weighs 3x a token of the long one; token mode: equal weights


def test_grpo_clipping_hand_value():
    # one answer of 2 tokens, A = 1, ratios (1.5, 0.5), eps 0.2:
    # terms -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5; sequence mean -0.85; first token clipped
    old = torch.zeros(1, 2, dtype=D)
    lp = t([[math.log(1.5), math.log(0.5)]]).requires_grad_()
    loss, stats, _ = grpo_loss(lp, old, t([1.0]), torch.ones(1, 2, dtype=D), clip_range=0.2)
    assert_close(loss, t(-0.85))
    assert_close(stats.clip_fraction, t(0.5))
    loss.backward()
    assert_close(lp.grad, t([[0.0, -0.25]]))  # clipped token: 0; other: -r A / 2 = -0.25
    # clip-higher 0.6: the first token is no longer clipped: -(1.5 + 0.5)/2 = -1
    loss_h, stats_h, _ = grpo_loss(lp, old, t([1.0]), torch.ones(1, 2, dtype=D), clip_range=0.2, clip_range_high=0.6)
    assert_close(loss_h, t(-1.0))
    assert_close(stats_h.clip_fraction, t(0.0))


@pytest.mark.parametrize("placement", ["loss", "loss_weighted"])
def test_grpo_kl_term(placement):
    _, log_probs, adv, mask = batch(5)
    gen = torch.Generator().manual_seed(6)
    ref = log_probs + 0.3 * torch.randn(log_probs.shape, dtype=D, generator=gen)
    beta = 0.04
    lp = log_probs.clone().requires_grad_()
    loss, _, mean_kl = grpo_loss(lp, log_probs, adv, mask, beta=beta, ref_log_probs=ref, kl_placement=placement)
    k3 = kl_k3(log_probs, ref)
    # reported KL: masked mean of k3 over real tokens, whatever the placement
    assert_close(mean_kl, (k3 * mask).sum() / mask.sum())
    assert not mean_kl.requires_grad
    # loss value (ratio 1 on-policy): sequence mean of (-A + beta k3) per token
    per_token = -adv.unsqueeze(-1) + beta * k3
    expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert_close(loss, expected)
    # gradient w.r.t. log pi, r = pi_ref/pi:
    #   "loss":          d(beta k3)/dlogpi = beta (1 - r)           (pathwise only: the reverse-KL gradient)
    #   "loss_weighted": d(beta k3 pi/pi_old)/dlogpi = beta (k3 + 1 - r) at pi = pi_old (score term restored)
    loss.backward()
    r = (ref - log_probs).exp()
    b = mask.shape[0]
    kl_grad = beta * (1 - r) if placement == "loss" else beta * (k3 + 1 - r)
    expected_grad = (-adv.unsqueeze(-1) + kl_grad) / (b * mask.sum(1, keepdim=True)) * mask
    assert_close(lp.grad, expected_grad)
    # hand value: 1 token, A = 0, pi = 0.5, pi_ref = 0.25, beta = 0.1: loss 0.1 (log 2 - 0.5)
    one = torch.ones(1, 1, dtype=D)
    lp1 = t([[math.log(0.5)]])
    loss1, _, kl1 = grpo_loss(lp1, lp1, t([0.0]), one, beta=0.1, ref_log_probs=t([[math.log(0.25)]]))
    assert_close(loss1, t(0.1 * (math.log(2.0) - 0.5)))
    assert_close(kl1, t(math.log(2.0) - 0.5))
    with pytest.raises(ValueError):
        grpo_loss(lp1, lp1, t([0.0]), one, beta=0.1)


def test_grpo_per_token_advantages():
    # (B, T) advantages are used as given; (B,) ones are broadcast over tokens
    _, log_probs, adv, mask = batch(7)
    loss_1d, _, _ = grpo_loss(log_probs, log_probs, adv, mask)
    loss_2d, _, _ = grpo_loss(log_probs, log_probs, adv.unsqueeze(-1).expand_as(log_probs).clone(), mask)
    assert_close(loss_1d, loss_2d)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 3])
def test_grpo_micro_batches_sum_to_full_batch(mode, seed, level):
    gen, log_probs, adv, mask = batch(seed, b=6, length=5)
    old = log_probs + 0.3 * torch.randn(log_probs.shape, dtype=D, generator=gen)
    ref = log_probs + 0.3 * torch.randn(log_probs.shape, dtype=D, generator=gen)
    kwargs = dict(clip_range=0.2, beta=0.05, aggregation=mode, constant_length=5.0, importance_ratio_level=level)

    full_lp = log_probs.clone().requires_grad_()
    full_loss, _, _ = grpo_loss(full_lp, old, adv, mask, ref_log_probs=ref, **kwargs)
    full_loss.backward()

    chunk_lp = log_probs.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        loss, _, _ = grpo_loss(chunk_lp[rows], old[rows], adv[rows], mask[rows], ref_log_probs=ref[rows],
                               num_tokens=mask.sum(), num_sequences=mask.shape[0], **kwargs)
        loss.backward()
        total = total + loss.detach()
    assert_close(total, full_loss.detach())
    assert_close(chunk_lp.grad, full_lp.grad)
    assert full_lp.grad.abs().sum() > 0

    # without the global counts the chunk losses do NOT add up (each would be normalised locally)
    local = sum(grpo_loss(log_probs[r], old[r], adv[r], mask[r], ref_log_probs=ref[r], **kwargs)[0]
                for r in (slice(0, 2), slice(2, 6)))
    assert not torch.allclose(local, full_loss.detach())


def test_answer_kl_penalty_is_minus_beta_times_the_sum_over_each_answers_real_tokens():
    """-beta sum_t k(a_t) per answer, by hand: padding (even NaN) adds nothing, and nothing is differentiable."""
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25), float("nan")], [math.log(0.5), 0.0, 0.0]],
                             dtype=D, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0], [math.log(0.5), 5.0, 5.0]], dtype=D)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    k1 = answer_kl_penalty(log_probs, ref, mask, 0.5, "k1")
    assert_close(k1, t([-0.5 * (math.log(2) - math.log(2)), 0.0]))
    k3 = answer_kl_penalty(log_probs, ref, mask, 0.5, "k3")
    # k3 = r - 1 - log r with r = pi_ref / pi: r = 1/2 then 2.
    assert_close(k3, t([-0.5 * ((0.5 - 1 - math.log(0.5)) + (2 - 1 - math.log(2))), 0.0]))
    assert not k3.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# GSPO: one ratio per answer (docs/math.md §6b)
# --------------------------------------------------------------------------------------------------------------------

def test_sequence_ratio_is_the_geometric_mean_of_the_token_ratios():
    # answer 0: token ratios 2 and 1/2 -> s = sqrt(2 * 0.5) = 1; answer 1: one token of ratio 1.5 -> s = 1.5;
    # answer 2: no token -> 1. Padding may hold anything (inf, nan).
    old = torch.zeros(3, 2, dtype=D)
    lp = t([[math.log(2.0), math.log(0.5)], [math.log(1.5), float("inf")], [float("nan"), 0.0]])
    mask = t([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert_close(sequence_importance_ratio(lp, old, mask), t([1.0, 1.5, 1.0]))
    # (pi / pi_old)^(1/|o|) with the sequence probabilities: ratios 3 and 1/12 -> (1/4)^(1/2) = 1/2
    lp = t([[math.log(3.0), math.log(1 / 12)]])
    assert_close(sequence_importance_ratio(lp, torch.zeros(1, 2, dtype=D), torch.ones(1, 2, dtype=D)), t([0.5]))


def test_sequence_ratio_gradient_on_policy_is_the_length_normalised_policy_gradient():
    """At pi_theta = pi_old, s_i = 1 and grad s_i = 1/|o_i| sum_t grad log pi(o_it). Each answer's |o_i| tokens
    carry s_i, so the sum of their gradients is sum_t grad log pi(o_it), as the token ratios' is: on policy the two
    levels have the same gradient in every aggregation (they part once the ratios leave 1, where the clip acts on
    whole answers: `test_sequence_ratio_clips_the_whole_answer`)."""
    _, log_probs, adv, mask = batch(4)
    lengths = mask.sum(1, keepdim=True)
    grads = {}
    for level in ("token", "sequence"):
        for mode in ("sequence", "token"):
            lp = log_probs.clone().requires_grad_()
            loss, stats, _ = grpo_loss(lp, log_probs, adv, mask, aggregation=mode, importance_ratio_level=level)
            loss.backward()
            grads[level, mode] = lp.grad
            assert_close(stats.ratio_mean, t(1.0))
    b = mask.shape[0]
    assert_close(grads["sequence", "sequence"], -adv.unsqueeze(-1) / (b * lengths) * mask)
    assert_close(grads["sequence", "sequence"], grads["token", "sequence"])
    # token mean of the sequence ratio: each answer's |o_i| identical terms, each with gradient (1/|o_i|) grad log pi
    assert_close(grads["sequence", "token"], -adv.unsqueeze(-1) / mask.sum() * mask)
    assert_close(grads["token", "token"], -adv.unsqueeze(-1) / mask.sum() * mask)


def test_sequence_ratio_clips_the_whole_answer():
    """One answer of 2 tokens, A = 1, token ratios 1.5 and 1.0, eps 0.2: the token ratio clips only the first token;
    the answer's ratio sqrt(1.5) = 1.2247 > 1.2 clips the whole answer (no gradient); eps_high 0.3 lets it through."""
    old, mask, advantage = torch.zeros(1, 2, dtype=D), torch.ones(1, 2, dtype=D), t([1.0])
    lp = t([[math.log(1.5), 0.0]]).requires_grad_()
    loss, stats, _ = grpo_loss(lp, old, advantage, mask, clip_range=0.2)
    loss.backward()
    assert_close(lp.grad, t([[0.0, -0.5]]))  # token level: the second token still learns
    assert_close(stats.clip_fraction, t(0.5))
    lp.grad = None
    loss, stats, _ = grpo_loss(lp, old, advantage, mask, clip_range=0.2, importance_ratio_level="sequence")
    assert_close(loss, t(-1.2))  # -min(s A, clip(s) A) = -1.2 on both tokens
    loss.backward()
    assert_close(lp.grad, t([[0.0, 0.0]]))
    assert_close(stats.clip_fraction, t(1.0))
    assert_close(stats.ratio_mean, t(math.sqrt(1.5)))
    lp.grad = None
    loss, _, _ = grpo_loss(lp, old, advantage, mask, clip_range=0.2, clip_range_high=0.3,
                           importance_ratio_level="sequence")
    loss.backward()
    # d(-s)/d log pi_t = -s / |o| on both tokens (per-answer mean of two identical terms)
    assert_close(lp.grad, torch.full((1, 2), -math.sqrt(1.5) / 2, dtype=D))
    with pytest.raises(ValueError, match="importance_ratio_level"):
        grpo_loss(lp, old, advantage, mask, importance_ratio_level="answer")
