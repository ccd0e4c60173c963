"""Seed 004's DPO derivation, end to end on a response space small enough to enumerate.

Preferences are sampled from the Bradley-Terry (or Plackett-Luce) model of a known reward r; a tabular policy
trained with the DPO loss must land on pi* = pi_ref exp(r / beta) / Z, the optimum of the KL-regularised RLHF
objective, without ever seeing r.
"""

import pytest
import torch

from advantage import exact
from advantage.objectives import bradley_terry_loss, plackett_luce_loss


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [2, 4])
def test_dpo_converges_to_the_closed_form_optimum(seed, k):
    problem = exact.random_preference_problem(num_prompts=2, num_responses=4, beta=0.5, seed=seed)
    prompts, ranked = exact.sample_rankings(problem, 30000, k, torch.Generator().manual_seed(seed + 10))
    policy = exact.train_tabular_dpo(problem, prompts, ranked)
    target = problem.optimal_policy()
    start = exact.total_variation(torch.softmax(problem.ref_logits, -1), target)
    distance = exact.total_variation(policy, target)
    assert start > 0.2  # the optimum is far from the reference, so landing on it means something
    assert distance < 0.05, (distance, start)


def test_optimal_policy_maximises_the_regularised_objective():
    """pi* maximises E_pi[r] - beta KL(pi || pi_ref) (seed 004's starting point): no perturbation does better."""
    problem = exact.random_preference_problem(seed=3)
    ref = torch.softmax(problem.ref_logits, -1)

    def objective(pi):
        return ((pi * problem.reward).sum(-1) - problem.beta * (pi * (pi / ref).log()).sum(-1)).sum()

    best = objective(problem.optimal_policy())
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        noise = 0.3 * torch.randn(problem.reward.shape, generator=generator, dtype=exact.DTYPE)
        other = torch.softmax(torch.log(problem.optimal_policy()) + noise, -1)
        assert objective(other) < best


def test_rankings_are_sampled_from_the_reward_model():
    """Gumbel-argsort sampling: P(y_1 preferred to y_2) follows sigma(r_1 - r_2) (Bradley-Terry)."""
    problem = exact.random_preference_problem(num_prompts=1, num_responses=2, seed=5)
    _, ranked = exact.sample_rankings(problem, 50000, 2, torch.Generator().manual_seed(1))
    first_wins = float((ranked[:, 0] == 0).to(torch.float64).mean())
    expected = float(torch.sigmoid(problem.reward[0, 0] - problem.reward[0, 1]))
    assert abs(first_wins - expected) < 4 * (expected * (1 - expected) / 50000) ** 0.5


def test_reward_model_losses_recover_the_reward_up_to_a_constant():
    """A tabular reward fitted with Bradley-Terry or Plackett-Luce recovers r(x, .) up to a per-prompt shift."""
    problem = exact.random_preference_problem(num_prompts=2, num_responses=4, seed=2)
    for k, loss_fn in ((2, None), (4, plackett_luce_loss)):
        prompts, ranked = exact.sample_rankings(problem, 30000, k, torch.Generator().manual_seed(k))
        scores = torch.zeros_like(problem.reward, requires_grad=True)
        optimizer = torch.optim.LBFGS([scores], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            ranked_scores = scores[prompts.unsqueeze(-1), ranked]
            loss = (bradley_terry_loss(ranked_scores[:, 0], ranked_scores[:, 1]) if loss_fn is None
                    else loss_fn(ranked_scores))
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted = scores.detach() - scores.detach().mean(-1, keepdim=True)
        truth = problem.reward - problem.reward.mean(-1, keepdim=True)
        assert float((fitted - truth).abs().max()) < 0.15


def _log_ratio_difference(problem: exact.PreferenceProblem, policy: torch.Tensor) -> torch.Tensor:
    """Delta(x) = log pi(y_0|x)/pi_ref(y_0|x) - log pi(y_1|x)/pi_ref(y_1|x) for two responses per prompt, (X,)."""
    log_ratio = policy.log() - torch.log_softmax(problem.ref_logits, -1)
    return log_ratio[:, 0] - log_ratio[:, 1]


def _two_response_pairs(seed: int, num: int, beta: float = 0.5):
    """A problem with two responses per prompt, `num` Bradley-Terry pairs, and the share of pairs in which response
    0 wins for each prompt (the empirical preference p)."""
    problem = exact.random_preference_problem(num_prompts=3, num_responses=2, beta=beta, seed=seed)
    prompts, ranked = exact.sample_rankings(problem, num, 2, torch.Generator().manual_seed(seed + 20))
    first_wins = torch.stack([(ranked[prompts == x, 0] == 0).to(exact.DTYPE).mean() for x in range(3)])
    return problem, prompts, ranked, first_wins


@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_lands_on_its_closed_form_optimum(seed):
    """IPO's expected loss p (Delta - 1/(2 beta))^2 + (1 - p)(Delta + 1/(2 beta))^2 is least at
    Delta = (p - 1/2) / beta (docs/math.md §6b): the tabular policy trained with `ipo_loss` lands there."""
    problem, prompts, ranked, p = _two_response_pairs(seed, 20000)
    policy = exact.train_tabular_dpo(problem, prompts, ranked, loss="ipo")
    torch.testing.assert_close(_log_ratio_difference(problem, policy), (p - 0.5) / problem.beta, atol=1e-6, rtol=0)
    true_p = torch.sigmoid(problem.reward[:, 0] - problem.reward[:, 1])
    assert ((p - true_p).abs() < 0.03).all()  # and p is the Bradley-Terry probability of the true reward


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_simpo_lands_on_its_closed_form_optimum(gamma):
    """SimPO's expected loss over a pair ranked each way, -p log sigma(u - gamma) - (1 - p) log sigma(-u - gamma) with
    u = beta (log pi(y_0) - log pi(y_1)) for one-token answers, is least where p sigma(gamma - u) =
    (1 - p) sigma(u + gamma) (docs/math.md §6b); at gamma = 0 where sigma(u) = p. The tabular policy lands there,
    whatever pi_ref is (SimPO has none)."""
    problem, prompts, ranked, p = _two_response_pairs(0, 20000)
    policy = exact.train_tabular_dpo(problem, prompts, ranked, loss="simpo", simpo_gamma=gamma)
    u = problem.beta * (policy[:, 0].log() - policy[:, 1].log())
    # d/du [p log sigma(u - gamma) + (1 - p) log sigma(-u - gamma)] = p sigma(gamma - u) - (1 - p) sigma(u + gamma)
    stationary = p * torch.sigmoid(gamma - u) - (1 - p) * torch.sigmoid(u + gamma)
    torch.testing.assert_close(stationary, torch.zeros_like(p), atol=1e-7, rtol=0)
    if gamma == 0:  # no margin: Bradley-Terry on log pi, so sigma(u) = p
        torch.testing.assert_close(torch.sigmoid(u), p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.25])
def test_conservative_dpo_lands_on_its_closed_form_optimum(label_smoothing):
    """With labels flipped with probability eps, sigma(beta Delta) = (1 - eps) p + eps (1 - p) at the optimum
    (docs/math.md §6b); for deterministic preferences (p = 1) that is beta Delta = log((1 - eps) / eps), where plain
    DPO's margin grows without bound."""
    problem, prompts, ranked, p = _two_response_pairs(3, 20000)
    policy = exact.train_tabular_dpo(problem, prompts, ranked, label_smoothing=label_smoothing)
    smoothed = (1 - label_smoothing) * p + label_smoothing * (1 - p)
    torch.testing.assert_close(problem.beta * _log_ratio_difference(problem, policy), torch.logit(smoothed),
                               atol=1e-6, rtol=0)
    # every pair prefers response 0
    always_first = ranked.sort(-1).values
    policy = exact.train_tabular_dpo(problem, prompts, always_first, label_smoothing=label_smoothing)
    margin = problem.beta * _log_ratio_difference(problem, policy)
    expected = torch.full_like(margin, torch.tensor((1 - label_smoothing) / label_smoothing).log().item())
    torch.testing.assert_close(margin, expected, atol=1e-6, rtol=0)
    plain = problem.beta * _log_ratio_difference(problem, exact.train_tabular_dpo(problem, prompts, always_first))
    assert (plain > 3 * expected).all()
