"""`advantage verify`: the seeds' claims checked against exact values, at a scale a person can watch.

Three groups of checks, each row a formula, an estimator, its measured bias and variance, and a verdict:

1. The policy gradient (docs/math.md §1). A small MDP is enumerated to get grad J exactly; each psi form,
   built from advantage.objectives, is sampled and its mean compared with the exact gradient in standard
   errors. Expected: every form unbiased (with an exact critic), variance falling from the total return to the
   advantage; GAE with a wrong critic unbiased only at lambda = 1; discounted reward-to-go unbiased for J_gamma
   only with the gamma^t factor.
2. The DPO optimum (docs/math.md §6): a tabular policy trained by pairwise and by Plackett-Luce DPO on sampled
   preferences lands on pi* = pi_ref exp(r / beta) / Z.
3. The KL estimators (docs/math.md §4): E[k1] = E[k3] = KL by Monte Carlo, and, exactly, which estimator in which
   placement has an unbiased gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from advantage import exact
from advantage.objectives.kl import KL_ESTIMATORS, KL_PLACEMENTS, categorical_kl, kl_estimate

Z_THRESHOLD = 4.5  # |mean - exact| in standard errors beyond which an estimator is called biased
DPO_TOLERANCE = 0.05  # total-variation distance to pi* accepted as "converged to the optimum"


@dataclass(frozen=True)
class CheckResult:
    """One row of the verification table.

    group: which claim; formula: the seed formula; estimator: what was measured.
    exact_bias: bias computed without sampling error (by enumeration): relative error ||E[g] - exact|| / ||exact||
        for gradients and KL values, total-variation distance to pi* for DPO.
    mc_z: the Monte Carlo mean's distance from the exact value in standard errors (largest component); NaN where
        nothing is sampled.
    variance: variance of a single-sample estimate (trace of the covariance), exact where enumerable; NaN if n/a.
    expected: the claim ("unbiased", "biased", ...); passed: whether the measurements agree with it.
    """

    group: str
    formula: str
    estimator: str
    exact_bias: float
    mc_z: float
    variance: float
    expected: str
    passed: bool


EXACT_TOLERANCE = 1e-9  # relative error below which an enumerated expectation equals the exact value
BIAS_FLOOR = 1e-3  # relative error above which an estimator is called biased


# (estimator, label, seed formula, gamma, lambda, expected unbiased)
_PG_ROWS = [
    ("total_return", "psi1 total return R(tau)", "sum_t' r_t'", 1.0, 0.0, True),
    ("reward_to_go", "psi2 reward-to-go", "sum_{t'>=t} r_t'", 1.0, 0.0, True),
    ("reward_to_go_baseline", "psi3 reward-to-go - V(s_t)", "sum_{t'>=t} r_t' - b(s_t)", 1.0, 0.0, True),
    ("q_value", "psi4 Q(s_t, a_t)", "Q^pi(s_t, a_t)", 1.0, 0.0, True),
    ("advantage", "psi5 A = Q - V", "Q^pi - V^pi", 1.0, 0.0, True),
    ("td_residual", "psi6 TD residual", "r_t + V(s_t+1) - V(s_t)", 1.0, 0.0, True),
    ("gae_exact_critic", "GAE lambda=0.9, exact V", "sum_l (g l)^l delta_t+l", 1.0, 0.9, True),
    ("gae_wrong_critic", "GAE lambda=1, V/2", "sum_l (g l)^l delta_t+l", 1.0, 1.0, True),
    ("gae_wrong_critic", "GAE lambda=0, V/2", "sum_l (g l)^l delta_t+l", 1.0, 0.0, False),
    ("reward_to_go_discounted", "gamma=0.8 reward-to-go", "sum gamma^(t'-t) r_t'", 0.8, 0.0, False),
    ("reward_to_go_discounted_gamma_t", "gamma=0.8, times gamma^t", "gamma^t sum gamma^(t'-t) r_t'", 0.8, 0.0,
     True),
]


def policy_gradient_checks(num_samples: int = 20000, seed: int = 0) -> list[CheckResult]:
    """Group 1: every psi form's Monte Carlo mean against the exact gradient of an enumerated MDP."""
    mdp = exact.random_mdp(num_states=4, num_actions=2, horizon=4, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(mdp.num_states, mdp.num_actions, generator=generator, dtype=exact.DTYPE)
    batch = exact.sample_trajectories(mdp, logits, num_samples, generator)
    exact_gradients = {gamma: exact.exact_policy_gradient(mdp, logits, gamma) for gamma in (1.0, 0.8)}
    rows = []
    for estimator, label, formula, gamma, lam, unbiased in _PG_ROWS:
        mean, variance = exact.exact_moments(mdp, logits, estimator, gamma, lam)
        bias = exact.relative_error(mean, exact_gradients[gamma])
        samples = exact.policy_gradient_samples(mdp, logits, batch, estimator, gamma=gamma, gae_lambda=lam)
        report = exact.compare_to_exact(samples, exact_gradients[gamma])
        if unbiased:
            passed = bias < EXACT_TOLERANCE and report.max_z < Z_THRESHOLD
        else:
            passed = bias > BIAS_FLOOR
        rows.append(CheckResult("policy gradient", formula, label, bias, report.max_z, variance,
                                "unbiased" if unbiased else "biased", passed))
    return rows


def dpo_checks(num_samples: int = 30000, seed: int = 0) -> list[CheckResult]:
    """Group 2: DPO (pairwise, and Plackett-Luce on 4-way rankings) converges to pi* = pi_ref e^(r/beta) / Z."""
    problem = exact.random_preference_problem(num_prompts=2, num_responses=4, beta=0.5, seed=seed)
    generator = torch.Generator().manual_seed(seed + 2)
    target = problem.optimal_policy()
    start = exact.total_variation(torch.softmax(problem.ref_logits, -1), target)
    rows = []
    for k, label in ((2, "pairwise DPO"), (4, "Plackett-Luce DPO, K=4")):
        prompts, ranked = exact.sample_rankings(problem, num_samples, k, generator)
        policy = exact.train_tabular_dpo(problem, prompts, ranked)
        distance = exact.total_variation(policy, target)
        rows.append(CheckResult("DPO optimum", "pi* = pi_ref exp(r/beta) / Z", f"{label} (from TV {start:.2f})",
                                distance, math.nan, math.nan, f"TV < {DPO_TOLERANCE}", distance < DPO_TOLERANCE))
    return rows


def kl_checks(num_samples: int = 200000, seed: int = 0) -> list[CheckResult]:
    """Group 3: KL estimators' values (Monte Carlo) and gradients by placement (exact)."""
    generator = torch.Generator().manual_seed(seed + 3)
    logits = torch.randn(6, generator=generator, dtype=exact.DTYPE)
    ref_logits = torch.randn(6, generator=generator, dtype=exact.DTYPE)
    true_kl = float(categorical_kl(logits, ref_logits))
    actions = torch.multinomial(torch.softmax(logits, -1), num_samples, replacement=True, generator=generator)
    log_probs = torch.log_softmax(logits, -1)[actions]
    ref_log_probs = torch.log_softmax(ref_logits, -1)[actions]
    rows = []
    pi = torch.softmax(logits, -1)
    all_log_probs, all_ref_log_probs = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    for estimator in KL_ESTIMATORS:
        per_action = kl_estimate(all_log_probs, all_ref_log_probs, estimator)
        mean = float((pi * per_action).sum())
        variance = float((pi * (per_action - mean) ** 2).sum())
        bias = abs(mean - true_kl) / true_kl
        values = kl_estimate(log_probs, ref_log_probs, estimator)
        z = abs(float(values.mean()) - true_kl) / (float(values.std()) / num_samples ** 0.5)
        unbiased = estimator != "k2"
        passed = (bias < EXACT_TOLERANCE and z < Z_THRESHOLD) if unbiased else bias > BIAS_FLOOR
        rows.append(CheckResult("KL value", "E_pi[k] = KL(pi||ref)", estimator, bias, z, variance,
                                "unbiased" if unbiased else "biased", passed))
    exact_gradient = exact.exact_kl_gradient(logits, ref_logits)
    unbiased_pairs = {("k1", "reward"), ("k2", "loss"), ("k1", "loss_weighted"), ("k3", "loss_weighted")}
    for placement in KL_PLACEMENTS:
        for estimator in KL_ESTIMATORS:
            expected = exact.expected_kl_gradient(logits, ref_logits, estimator, placement)
            error = exact.relative_error(expected, exact_gradient)
            unbiased = (estimator, placement) in unbiased_pairs
            passed = error < EXACT_TOLERANCE if unbiased else error > BIAS_FLOOR
            rows.append(CheckResult("KL gradient", "E[g] = grad KL(pi||ref)", f"{estimator} in {placement}", error,
                                    math.nan, math.nan, "unbiased" if unbiased else "biased", passed))
    return rows


CHECKS: tuple[Callable[..., list[CheckResult]], ...] = (policy_gradient_checks, dpo_checks, kl_checks)


def run_all(seed: int = 0) -> list[CheckResult]:
    """Every check, in the seeds' order."""
    rows: list[CheckResult] = []
    for check in CHECKS:
        rows.extend(check(seed=seed))
    return rows


def format_table(rows: list[CheckResult]) -> str:
    """The rows as an aligned plain-text table."""
    def number(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.3g}"

    header = ("group", "estimator", "formula", "exact bias", "MC |z|", "variance", "expected", "result")
    body = [(r.group, r.estimator, r.formula, number(r.exact_bias), number(r.mc_z), number(r.variance), r.expected,
             "PASS" if r.passed else "FAIL") for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(seed: int = 0) -> int:
    """Run every check, print the table and a summary; return 0 if all pass, 1 otherwise."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    rows = run_all(seed)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    seconds = time.perf_counter() - start
    verdict = "all checks pass" if not failed else f"{len(failed)} FAILED"
    print(f"\nverify: {len(rows) - len(failed)} of {len(rows)} checks agree with the seeds, {verdict} "
          f"({seconds:.1f} s).\nexact bias: relative error of the expectation computed by enumeration (total-variation "
          f"distance to pi* for DPO); MC |z|: distance of the Monte Carlo mean from the exact value in standard "
          f"errors (unbiased rows must stay below {Z_THRESHOLD}); variance: trace of the single-sample covariance.")
    return 0 if not failed else 1
