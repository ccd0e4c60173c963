"""The exact policy gradient of an enumerated MDP, and the seeds' estimators measured against it.

Seed 000/003 derive grad J = E[R(tau) grad log P(tau)]; seed 004 lists six psi forms; seed 003 derives GAE.
Here J and grad J are computed exactly by summing over every trajectory, and each estimator built from
advantage.objectives is checked two ways: its expectation computed exactly by enumeration (no sampling error),
and its Monte Carlo mean over sampled trajectories (within a few standard errors).
"""

import pytest
import torch

from advantage import exact

SEEDS = [0, 1, 2]


def problem(seed: int):
    mdp = exact.random_mdp(num_states=4, num_actions=2, horizon=4, seed=seed)
    logits = torch.randn(4, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=exact.DTYPE)
    return mdp, logits


@pytest.mark.parametrize("seed", SEEDS)
def test_enumeration_is_a_probability_distribution(seed):
    mdp, logits = problem(seed)
    batch = exact.enumerate_trajectories(mdp)
    probs = exact.trajectory_log_probability(mdp, logits, batch).exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=exact.DTYPE))
    # Episodes end either at the horizon or on the step that entered the terminal state, never both early and not.
    lengths = batch.mask.sum(-1)
    ended = batch.terminated.any(-1)
    assert bool(((lengths == mdp.horizon) | ended).all())


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_gradient_is_the_log_derivative_identity(seed):
    """grad sum_tau P(tau) R(tau) == sum_tau P(tau) R(tau) grad log P(tau) (seed 003's derivation, line by line)."""
    mdp, logits = problem(seed)
    batch = exact.enumerate_trajectories(mdp)
    returns = batch.rewards.sum(-1)
    theta = logits.clone().requires_grad_(True)
    log_p = exact.trajectory_log_probability(mdp, theta, batch)
    weights = (log_p.detach().exp() * returns)
    (identity,) = torch.autograd.grad((weights * log_p).sum(), theta)
    torch.testing.assert_close(exact.exact_policy_gradient(mdp, logits), identity)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_gradient_matches_finite_differences(seed):
    mdp, logits = problem(seed)
    gradient = exact.exact_policy_gradient(mdp, logits)
    eps = 1e-6
    for s in range(mdp.num_states):
        for a in range(mdp.num_actions):
            bump = torch.zeros_like(logits)
            bump[s, a] = eps
            numeric = (exact.exact_objective(mdp, logits + bump)
                       - exact.exact_objective(mdp, logits - bump)) / (2 * eps)
            assert abs(float(numeric) - float(gradient[s, a])) < 1e-7


@pytest.mark.parametrize("seed", SEEDS)
def test_dynamic_programming_values_match_enumeration(seed):
    mdp, logits = problem(seed)
    values, _ = exact.exact_values(mdp, logits)
    expected = (mdp.initial * values[0]).sum()
    torch.testing.assert_close(expected, exact.exact_objective(mdp, logits))


UNBIASED = [("total_return", 1.0, 0.0), ("reward_to_go", 1.0, 0.0), ("reward_to_go_baseline", 1.0, 0.0),
            ("q_value", 1.0, 0.0), ("advantage", 1.0, 0.0), ("td_residual", 1.0, 0.0),
            ("gae_exact_critic", 1.0, 0.0), ("gae_exact_critic", 1.0, 0.5), ("gae_exact_critic", 1.0, 0.95),
            ("gae_wrong_critic", 1.0, 1.0), ("reward_to_go_discounted_gamma_t", 0.8, 0.0),
            ("total_return", 0.8, 0.0)]  # psi_1 = sum_t' gamma^t' r_t' is unbiased for J_gamma as written
# With gamma < 1, psi forms 2-6 as the seed writes them (without gamma^t) are biased for grad J_gamma.
BIASED = [("gae_wrong_critic", 1.0, 0.0), ("gae_wrong_critic", 1.0, 0.5), ("reward_to_go_discounted", 0.8, 0.0),
          ("reward_to_go_baseline", 0.8, 0.0), ("q_value", 0.8, 0.0), ("advantage", 0.8, 0.0),
          ("td_residual", 0.8, 0.0)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator,gamma,lam", UNBIASED)
def test_estimator_expectation_is_exactly_the_gradient(seed, estimator, gamma, lam):
    mdp, logits = problem(seed)
    mean, _ = exact.exact_moments(mdp, logits, estimator, gamma, lam)
    assert exact.relative_error(mean, exact.exact_policy_gradient(mdp, logits, gamma)) < 1e-10


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator,gamma,lam", BIASED)
def test_biased_estimators_are_measurably_biased(seed, estimator, gamma, lam):
    """GAE with lambda < 1 and a wrong critic, and discounted reward-to-go without gamma^t, are biased."""
    mdp, logits = problem(seed)
    mean, _ = exact.exact_moments(mdp, logits, estimator, gamma, lam)
    assert exact.relative_error(mean, exact.exact_policy_gradient(mdp, logits, gamma)) > 0.02


@pytest.mark.parametrize("estimator,gamma,lam", UNBIASED[:8])
def test_monte_carlo_mean_within_standard_errors(estimator, gamma, lam):
    mdp, logits = problem(0)
    generator = torch.Generator().manual_seed(7)
    batch = exact.sample_trajectories(mdp, logits, 20000, generator)
    samples = exact.policy_gradient_samples(mdp, logits, batch, estimator, gamma, lam)
    report = exact.compare_to_exact(samples, exact.exact_policy_gradient(mdp, logits, gamma))
    assert report.max_z < 4.5, report
    assert report.relative_bias < 0.1, report


def test_monte_carlo_detects_the_wrong_critic_bias():
    mdp, logits = problem(0)
    batch = exact.sample_trajectories(mdp, logits, 20000, torch.Generator().manual_seed(7))
    samples = exact.policy_gradient_samples(mdp, logits, batch, "gae_wrong_critic", 1.0, 0.0)
    assert exact.compare_to_exact(samples, exact.exact_policy_gradient(mdp, logits)).max_z > 6


@pytest.mark.parametrize("seed", SEEDS)
def test_reward_to_go_and_baseline_lower_the_variance(seed):
    """Seed 000/003's two improvements, measured exactly: reward-to-go < total return; with V(s_t) lower still."""
    mdp, logits = problem(seed)
    variance = {name: exact.exact_moments(mdp, logits, name, 1.0, 0.0)[1]
                for name in ("total_return", "reward_to_go", "reward_to_go_baseline", "advantage")}
    assert variance["reward_to_go"] < 0.75 * variance["total_return"]
    assert variance["reward_to_go_baseline"] < 0.5 * variance["reward_to_go"]
    assert variance["advantage"] < variance["reward_to_go_baseline"]


def test_sampled_trajectories_follow_the_enumerated_distribution():
    mdp, logits = problem(1)
    batch = exact.sample_trajectories(mdp, logits, 40000, torch.Generator().manual_seed(3))
    sampled_mean_return = float(batch.rewards.sum(-1).mean())
    std_error = float(batch.rewards.sum(-1).std()) / 200.0
    assert abs(sampled_mean_return - float(exact.exact_objective(mdp, logits))) < 4 * std_error


def test_discounted_objective_is_the_expected_initial_value():
    """Seed 004: J(theta) = E_{s_0}[V(s_0)] = E[sum_t gamma^t r_t], the two forms agree."""
    mdp, logits = problem(2)
    values, _ = exact.exact_values(mdp, logits, gamma=0.8)
    torch.testing.assert_close((mdp.initial * values[0]).sum(), exact.exact_objective(mdp, logits, gamma=0.8))


def test_deterministic_transitions_leave_only_the_policy_terms():
    """Seed 003, language models: with one start state and deterministic transitions, log P(tau) = sum_t log pi."""
    mdp = exact.random_mdp(num_states=5, num_actions=3, horizon=3, seed=4)
    mdp.initial = torch.zeros(5, dtype=exact.DTYPE)
    mdp.initial[0] = 1.0
    # s' = (s + a + 1) mod 4: the next "prefix" is a function of the current one and the token.
    mdp.transition = torch.zeros(5, 3, 5, dtype=exact.DTYPE)
    for s in range(5):
        for a in range(3):
            mdp.transition[s, a, (s + a + 1) % 4] = 1.0
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=exact.DTYPE)
    batch = exact.enumerate_trajectories(mdp)
    assert batch.states.shape[0] == 3 ** 3  # one trajectory per action sequence
    policy_only = (torch.log_softmax(logits, -1)[batch.states, batch.actions] * batch.mask).sum(-1)
    torch.testing.assert_close(exact.trajectory_log_probability(mdp, logits, batch), policy_only)
