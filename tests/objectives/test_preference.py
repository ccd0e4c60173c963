"""Bradley-Terry, K-wise and Plackett-Luce reward losses; pairwise and listwise DPO, conservative DPO, IPO and the
hinge (objectives.preference)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.preference import (
    bradley_terry_loss,
    bradley_terry_probability,
    chosen_nll_loss,
    dpo_implicit_rewards,
    dpo_loss,
    hinge_dpo_loss,
    ipo_loss,
    kwise_pairwise_loss,
    plackett_luce_dpo_loss,
    plackett_luce_log_likelihood,
    plackett_luce_loss,
    reward_centering_loss,
    simpo_loss,
)

D = torch.float64
HYP = settings(max_examples=50, deadline=None)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


scores_list = st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=12)


# --------------------------------------------------------------------------------------------------------------------
# Bradley-Terry
# --------------------------------------------------------------------------------------------------------------------

def test_bradley_terry_hand_values():
    # P = sigma(r_w - r_l): sigma(1) = 1/(1 + e^-1) = 0.7310586, sigma(0) = 0.5
    assert_close(bradley_terry_probability(t([1.0, 0.0]), t([0.0, 0.0])), t([0.7310585786300049, 0.5]))
    # loss = -mean(log sigma(1), log sigma(0)) = (log(1 + e^-1) + log 2) / 2 = (0.3132617 + 0.6931472) / 2
    loss = bradley_terry_loss(t([1.0, 0.0]), t([0.0, 0.0]))
    assert_close(loss, t((0.31326168751822286 + math.log(2.0)) / 2))
    # exp form of seed 004: e^{r_w} / (e^{r_w} + e^{r_l})
    rw, rl = t([0.3, -2.0]), t([1.1, -2.5])
    assert_close(bradley_terry_probability(rw, rl), rw.exp() / (rw.exp() + rl.exp()))
    # stable at huge margins: -log sigma(-1000) = 1000, -log sigma(1000) = 0
    assert_close(bradley_terry_loss(t([-1000.0]), t([0.0])), t(1000.0))
    assert_close(bradley_terry_loss(t([1000.0]), t([0.0])), t(0.0))


def test_bradley_terry_gradient():
    # d/dr_w -log sigma(m) = -(1 - sigma(m)) = -sigma(-m); batch of 1, m = 1: -0.2689414
    rw, rl = t([1.0]).requires_grad_(), t([0.0]).requires_grad_()
    bradley_terry_loss(rw, rl).backward()
    assert_close(rw.grad, t([-1.0 / (1.0 + math.e)]))
    assert_close(rl.grad, t([1.0 / (1.0 + math.e)]))


# --------------------------------------------------------------------------------------------------------------------
# K-wise (InstructGPT) loss
# --------------------------------------------------------------------------------------------------------------------

def test_kwise_hand_value():
    # ranking scores (2, 1, 0): pairs (0,1) margin 1, (0,2) margin 2, (1,2) margin 1
    # loss = -(2 log sigma(1) + log sigma(2)) / 3 = (2 * 0.3132617 + 0.1269280) / 3 = 0.2511505
    loss = kwise_pairwise_loss(t([[2.0, 1.0, 0.0]]))
    assert_close(loss, t(-(2 * log_sigmoid(1.0) + log_sigmoid(2.0)) / 3))
    assert_close(loss, t(0.25115047), atol=1e-7, rtol=0)
    with pytest.raises(ValueError):
        kwise_pairwise_loss(t([[1.0]]))


@HYP
@given(pairs=st.lists(st.tuples(st.floats(-10.0, 10.0), st.floats(-10.0, 10.0)), min_size=1, max_size=12))
def test_kwise_and_plackett_luce_with_k2_equal_bradley_terry(pairs):
    chosen = t([a for a, _ in pairs])
    rejected = t([b for _, b in pairs])
    ranked = torch.stack([chosen, rejected], dim=-1)
    bt = bradley_terry_loss(chosen, rejected)
    assert_close(kwise_pairwise_loss(ranked), bt)
    assert_close(plackett_luce_loss(ranked), bt)


def slow_kwise(ranked: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for row in ranked.tolist():
        k = len(row)
        pair_losses = [-log_sigmoid(row[i] - row[j]) for i in range(k) for j in range(i + 1, k)]
        assert len(pair_losses) == math.comb(k, 2)
        total += sum(pair_losses) / len(pair_losses)
    return t(total / ranked.shape[0])


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_kwise_equals_mean_over_all_pairs(k):
    gen = torch.Generator().manual_seed(k)
    ranked = 2 * torch.randn(5, k, dtype=D, generator=gen)
    assert_close(kwise_pairwise_loss(ranked), slow_kwise(ranked))


def test_kwise_mask_equals_unpadded():
    gen = torch.Generator().manual_seed(8)
    full = torch.randn(3, 5, dtype=D, generator=gen)
    lengths = [5, 3, 2]
    mask = torch.zeros(3, 5, dtype=D)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    padded = torch.where(mask.bool(), full, t(123.0)).requires_grad_()  # junk where absent
    loss = kwise_pairwise_loss(padded, mask)
    expected = sum(kwise_pairwise_loss(full[b: b + 1, :n]) for b, n in enumerate(lengths)) / 3
    assert_close(loss, expected)
    loss.backward()
    assert torch.all(padded.grad[~mask.bool()] == 0)
    assert torch.isfinite(padded.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# Plackett-Luce
# --------------------------------------------------------------------------------------------------------------------

def test_plackett_luce_hand_value():
    # scores (2, 1, 0) in ranked order:
    # log P = [2 - log(e^2 + e^1 + e^0)] + [1 - log(e^1 + e^0)] + [0 - log e^0]
    #       = (2 - 2.4076059) + (1 - 1.3132617) + 0 = -0.4076059 - 0.3132617 = -0.7208676
    ll = plackett_luce_log_likelihood(t([[2.0, 1.0, 0.0]]))
    expected = (2 - math.log(math.e ** 2 + math.e + 1)) + (1 - math.log(math.e + 1))
    assert_close(ll, t([expected]))
    assert_close(ll, t([-0.7208676]), atol=1e-7, rtol=0)
    assert_close(plackett_luce_loss(t([[2.0, 1.0, 0.0]])), t(-expected))


def slow_plackett_luce(row: list[float]) -> float:
    # prod_k softmax over the answers not yet placed, evaluated at the one placed k-th
    prob = 1.0
    remaining = list(range(len(row)))
    for idx in range(len(row)):
        denominator = sum(math.exp(row[j]) for j in remaining)
        prob *= math.exp(row[idx]) / denominator
        remaining.remove(idx)
    return math.log(prob)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_plackett_luce_equals_explicit_product_of_softmaxes(k):
    gen = torch.Generator().manual_seed(10 + k)
    ranked = torch.randn(4, k, dtype=D, generator=gen)
    expected = t([slow_plackett_luce(row) for row in ranked.tolist()])
    assert_close(plackett_luce_log_likelihood(ranked), expected)
    # shifting all scores of a ranking leaves the likelihood unchanged (softmaxes)
    assert_close(plackett_luce_log_likelihood(ranked + 5.0), expected)


def test_plackett_luce_probabilities_over_all_permutations_sum_to_one():
    gen = torch.Generator().manual_seed(12)
    scores = 1.5 * torch.randn(4, dtype=D, generator=gen)
    perms = list(itertools.permutations(range(4)))
    assert len(perms) == 24
    rankings = torch.stack([scores[list(p)] for p in perms])  # (24, 4), each a ranking of the same answers
    probs = plackett_luce_log_likelihood(rankings).exp()
    assert_close(probs.sum(), t(1.0))
    # the most likely ranking is the one sorted by score
    best = torch.argsort(scores, descending=True).tolist()
    assert list(perms[int(probs.argmax())]) == best


def test_plackett_luce_mask_equals_unpadded():
    gen = torch.Generator().manual_seed(13)
    full = torch.randn(4, 5, dtype=D, generator=gen)
    lengths = [5, 4, 2, 1]
    mask = torch.zeros(4, 5, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    padded = torch.where(mask, full, t(50.0)).requires_grad_()  # junk where absent
    ll = plackett_luce_log_likelihood(padded, mask)
    expected = torch.stack([plackett_luce_log_likelihood(full[b: b + 1, :n])[0] for b, n in enumerate(lengths)])
    assert_close(ll, expected)
    assert_close(ll[3], t(0.0))  # a ranking of one answer is certain
    # gradients: zero on absent answers, and equal to the unpadded ones on present answers
    ll.sum().backward()
    assert torch.isfinite(padded.grad).all()
    assert torch.all(padded.grad[~mask] == 0)
    for b, n in enumerate(lengths):
        row = full[b: b + 1, :n].clone().requires_grad_()
        plackett_luce_log_likelihood(row).sum().backward()
        assert_close(padded.grad[b, :n], row.grad[0])
    assert_close(plackett_luce_loss(padded, mask), -expected.mean())


# --------------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------------

def test_dpo_hand_example():
    # beta = 0.1
    # pair 1: chosen 0.1 (-1 - -1.5) = 0.05, rejected 0.1 (-2 - -1) = -0.1, margin 0.15, loss log(1 + e^-0.15)
    # pair 2: chosen 0.1 (-3 - -2) = -0.1, rejected 0.1 (-1 - -1) = 0, margin -0.1, loss log(1 + e^0.1)
    # loss = (0.6209570 + 0.7443967) / 2 = 0.6826769; accuracy 1/2
    pc, pr = t([-1.0, -3.0]).requires_grad_(), t([-2.0, -1.0]).requires_grad_()
    rc, rr = t([-1.5, -2.0]).requires_grad_(), t([-1.0, -1.0]).requires_grad_()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, t((math.log1p(math.exp(-0.15)) + math.log1p(math.exp(0.1))) / 2))
    assert_close(loss, t(0.6826769), atol=1e-7, rtol=0)
    assert_close(stats.chosen_rewards, t([0.05, -0.1]))
    assert_close(stats.rejected_rewards, t([-0.1, 0.0]))
    assert_close(stats.margins, t([0.15, -0.1]))
    assert_close(stats.accuracy, t(0.5))
    assert not stats.margins.requires_grad and not stats.chosen_rewards.requires_grad
    loss.backward()
    # d loss / d log pi(y_w) = -beta sigma(-margin) / B; the reference gets no gradient
    assert_close(pc.grad, t([-0.1 * (1 / (1 + math.exp(0.15))) / 2, -0.1 * (1 / (1 + math.exp(-0.1))) / 2]))
    assert_close(pr.grad, -pc.grad)
    assert rc.grad is None and rr.grad is None


def test_dpo_implicit_rewards_and_beta_validation():
    # beta log(pi/pi_ref) = 0.5 * (-1 - -3) = 1
    assert_close(dpo_implicit_rewards(t([-1.0]), t([-3.0]), 0.5), t([1.0]))
    args = (t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]))
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError):
            dpo_loss(*args, beta=beta)
        with pytest.raises(ValueError):
            plackett_luce_dpo_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), beta)
    # policy == reference: every implicit reward is 0, the loss is log 2
    loss, stats = dpo_loss(*args, beta=0.3)
    assert_close(loss, t(math.log(2.0)))
    assert_close(stats.accuracy, t(0.0))  # margin 0 is not counted as correct


@HYP
@given(
    values=st.lists(st.tuples(*[st.floats(-20.0, 0.0)] * 4), min_size=1, max_size=10),
    beta=st.floats(0.01, 2.0),
)
def test_plackett_luce_dpo_with_k2_equals_dpo(values, beta):
    pc, pr, rc, rr = (t([v[i] for v in values]) for i in range(4))
    pair_loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    pl_loss, rewards = plackett_luce_dpo_loss(torch.stack([pc, pr], -1), torch.stack([rc, rr], -1), beta)
    assert_close(pl_loss, pair_loss)
    assert_close(rewards[:, 0], stats.chosen_rewards)
    assert_close(rewards[:, 1], stats.rejected_rewards)


def test_plackett_luce_dpo_hand_value_and_mask():
    # K = 3, beta = 1, policy = ref + (1, 0, -1): h = (1, 0, -1), loss = -log P_PL(1, 0, -1)
    # = -[(1 - log(e + 1 + e^-1)) + (0 - log(1 + e^-1))]
    ref = t([[-4.0, -5.0, -6.0]])
    policy = ref + t([[1.0, 0.0, -1.0]])
    loss, rewards = plackett_luce_dpo_loss(policy, ref, 1.0)
    expected = -((1 - math.log(math.e + 1 + math.exp(-1))) + (0 - math.log(1 + math.exp(-1))))
    assert_close(loss, t(expected))
    assert_close(rewards, t([[1.0, 0.0, -1.0]]))
    # mask the third answer away: the 2-answer ranking is pairwise DPO
    mask = t([[1.0, 1.0, 0.0]])
    loss_m, _ = plackett_luce_dpo_loss(policy, ref, 1.0, mask)
    pair, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], 1.0)
    assert_close(loss_m, pair)
    assert_close(loss_m, t(-log_sigmoid(1.0)))
    # beta scales the implicit rewards: beta = 2 doubles h
    loss_b, rewards_b = plackett_luce_dpo_loss(policy, ref, 2.0)
    assert_close(rewards_b, 2 * rewards)
    assert_close(loss_b, plackett_luce_loss(t([[2.0, 0.0, -2.0]])))


def test_dpo_is_bradley_terry_of_implicit_rewards():
    gen = torch.Generator().manual_seed(21)
    pc, pr, rc, rr = (torch.randn(6, dtype=D, generator=gen) - 3 for _ in range(4))
    beta = 0.2
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    assert_close(loss, -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean())


# --------------------------------------------------------------------------------------------------------------------
# Beyond the notes: conservative DPO, IPO, hinge (docs/math.md §6b)
# --------------------------------------------------------------------------------------------------------------------

# The pairs of test_dpo_hand_example: log-ratio differences Delta = 1.5 and -1.0, at beta = 0.1 margins 0.15, -0.1.
HAND_PAIRS = (t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.0, -1.0]))


def _leaves():
    return [value.clone().requires_grad_() for value in HAND_PAIRS]


def test_conservative_dpo_hand_values_and_gradient():
    # eps = 0.2: each pair costs -(0.8 log sigma(m) + 0.2 log sigma(-m)), m = 0.15 and -0.1
    pc, pr, rc, rr = _leaves()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    expected = sum(-(0.8 * log_sigmoid(m) + 0.2 * log_sigmoid(-m)) for m in (0.15, -0.1)) / 2
    assert_close(loss, t(expected))
    assert_close(stats.margins, t([0.15, -0.1]))  # the stats do not depend on the loss
    loss.backward()
    # d/dm = -(0.8 sigma(-m) - 0.2 sigma(m)) = sigma(m) - 0.8, and dm / d log pi(y_w) = beta; mean over 2 pairs
    sigma = torch.sigmoid(t([0.15, -0.1]))
    assert_close(pc.grad, 0.1 * (sigma - 0.8) / 2)
    assert_close(pr.grad, -pc.grad)
    assert rc.grad is None
    # eps = 0 is DPO; eps outside [0, 0.5) is refused
    assert_close(dpo_loss(*HAND_PAIRS, 0.1, 0.0)[0], dpo_loss(*HAND_PAIRS, 0.1)[0])
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(*HAND_PAIRS, 0.1, eps)


def test_ipo_hand_values_and_gradient():
    # beta = 0.1: target 1 / (2 beta) = 5; Delta = 1.5 and -1: ((1.5 - 5)^2 + (-1 - 5)^2) / 2 = (12.25 + 36) / 2
    pc, pr, rc, rr = _leaves()
    loss, stats = ipo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, t(24.125))
    assert_close(stats.chosen_rewards, t([0.05, -0.1]))
    assert_close(stats.accuracy, t(0.5))
    loss.backward()
    # d/d log pi(y_w) = 2 (Delta - 5) / 2 = (-3.5, -6); the rejected answer gets the opposite
    assert_close(pc.grad, t([-3.5, -6.0]))
    assert_close(pr.grad, t([3.5, 6.0]))
    assert rc.grad is None and rr.grad is None
    # the loss is zero exactly at Delta = 1 / (2 beta), for any beta
    for beta in (0.05, 0.5, 2.0):
        at_target = ipo_loss(t([1 / (2 * beta)]), t([0.0]), t([0.0]), t([0.0]), beta)[0]
        assert_close(at_target, t(0.0))
    with pytest.raises(ValueError):
        ipo_loss(*HAND_PAIRS, beta=0.0)


def test_hinge_hand_values_and_gradient():
    # beta = 0.1: margins 0.15 and -0.1: (max(0, 0.85) + max(0, 1.1)) / 2 = 0.975
    pc, pr, rc, rr = _leaves()
    loss, _ = hinge_dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, t(0.975))
    loss.backward()
    assert_close(pc.grad, t([-0.05, -0.05]))  # -beta / B for every pair inside the margin
    assert_close(pr.grad, t([0.05, 0.05]))
    # beta = 1: the first pair's margin 1.5 is past the hinge, so it has no loss and no gradient
    pc, pr, rc, rr = _leaves()
    loss, _ = hinge_dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert_close(loss, t(1.0))  # (0 + 2) / 2
    loss.backward()
    assert_close(pc.grad, t([0.0, -0.5]))
    with pytest.raises(ValueError):
        hinge_dpo_loss(*HAND_PAIRS, beta=-1.0)


def test_simpo_hand_values_and_gradient():
    # beta 2, gamma 0.5. Pair 1: log pi -6 over 3 tokens, -2 over 4: g = 2 (-2) = -4 and 2 (-0.5) = -1, so the
    # argument is -4 + 1 - 0.5 = -3.5. Pair 2: -1 over 1, -4 over 2: g = -2 and -4, argument 1.5.
    chosen, rejected = t([-6.0, -1.0]).requires_grad_(), t([-2.0, -4.0]).requires_grad_()
    loss, stats = simpo_loss(chosen, rejected, torch.tensor([3, 1]), torch.tensor([4, 2]), beta=2.0, gamma=0.5)
    softplus = [math.log1p(math.exp(3.5)), math.log1p(math.exp(-1.5))]  # -log sigma(x) = log(1 + e^-x)
    assert_close(loss, t(sum(softplus) / 2))
    assert_close(stats.chosen_rewards, t([-4.0, -2.0]))  # beta/|y| log pi, no reference
    assert_close(stats.margins, t([-3.0, 2.0]))
    loss.backward()
    # d/d log pi(y_w) = -sigma(-x) beta / |y_w| / B
    sig = [1 / (1 + math.exp(-3.5)), 1 / (1 + math.exp(1.5))]
    assert_close(chosen.grad, t([-sig[0] * 2 / 3 / 2, -sig[1] * 2 / 1 / 2]))
    assert_close(rejected.grad, t([sig[0] * 2 / 4 / 2, sig[1] * 2 / 2 / 2]))
    with pytest.raises(ValueError):
        simpo_loss(chosen, rejected, torch.tensor([3, 1]), torch.tensor([4, 2]), beta=0.0)


def test_rpo_nll_hand_values_and_gradient():
    # log pi(y_w) = -6 over 3 tokens and -2 over 4 tokens: -((-6 / 3) + (-2 / 4)) / 2 = 1.25
    log_probs = t([-6.0, -2.0]).requires_grad_()
    loss = chosen_nll_loss(log_probs, torch.tensor([3, 4]))
    assert_close(loss, t(1.25))
    loss.backward()
    assert_close(log_probs.grad, t([-1 / 6, -1 / 8]))  # -1 / (B |y_w|): a short answer's tokens weigh more
    assert_close(chosen_nll_loss(t([-3.0]), torch.tensor([0])), t(3.0))  # an empty count is taken as 1


def test_reward_centering_hand_values_and_gradient():
    # pairs (1, -3) and (2, 0.5): ((1 - 3)^2 + 2.5^2) / 2 = (4 + 6.25) / 2; TRL's (r_w + r_l)^2 for pairs
    rewards = t([[1.0, -3.0], [2.0, 0.5]]).requires_grad_()
    loss = reward_centering_loss(rewards)
    assert_close(loss, t(5.125))
    loss.backward()
    # d/dr = 2 (r_w + r_l) / B on both answers of a pair: it moves the level, never the difference
    assert_close(rewards.grad, t([[-2.0, -2.0], [2.5, 2.5]]))
    # K = 3: the mean over its three pairs; a masked third answer leaves the pair alone
    ranking = t([[1.0, 2.0, 3.0]])
    assert_close(reward_centering_loss(ranking), t((9.0 + 16.0 + 25.0) / 3))
    assert_close(reward_centering_loss(ranking, t([[1.0, 1.0, 0.0]])), t(9.0))
    padded = t([[1.0, 2.0, float("nan")]])  # padding may hold anything
    assert_close(reward_centering_loss(padded, t([[1.0, 1.0, 0.0]])), t(9.0))
    # the preference losses see differences only: shifting every reward changes the centring term alone
    shifted = ranking + 5.0
    assert_close(kwise_pairwise_loss(shifted), kwise_pairwise_loss(ranking))
    assert reward_centering_loss(shifted) > reward_centering_loss(ranking)
