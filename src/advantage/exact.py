"""Problems small enough to enumerate, where the seeds' quantities have exact values to test estimators against.

- `TabularMDP`: a few states and actions, a short horizon. Enumerating every trajectory gives
  J(theta) = sum_tau P_theta(tau) R(tau) and, by autograd, the exact policy gradient (docs/math.md §1); dynamic
  programming gives the exact V and Q used as baselines and critics.
- `policy_gradient_samples`: per-trajectory gradient estimates built *only* from advantage.objectives
  (psi, policy_gradient_loss, gae), so that their Monte Carlo mean can be compared with the exact gradient.
- `train_tabular_dpo`: a tabular policy over a small response space trained with the DPO losses, to compare
  with the closed-form optimum pi* = pi_ref exp(r / beta) / Z (docs/math.md §6).
- `expected_kl_gradient`: the exact expectation of each KL estimator's gradient in each placement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from advantage.objectives.kl import KLEstimator, KLPlacement, categorical_kl, kl_loss_term, kl_reward_penalty
from advantage.objectives.policy_gradient import policy_gradient_loss, psi
from advantage.objectives.preference import dpo_loss, ipo_loss, plackett_luce_dpo_loss, simpo_loss
from advantage.objectives.returns import gae

DTYPE = torch.float64


@dataclass
class TabularMDP:
    """A finite MDP with a finite horizon; entering a terminal state ends the episode (terminated).

    initial: (S,) distribution of s_0 (zero on terminal states).
    transition: (S, A, S) P(s' | s, a).
    reward: (S, A) r(s, a), received when a is taken in s.
    terminal: (S,) bool.
    horizon: the episode stops after this many steps at the latest (finite-horizon objective: nothing after).
    """

    initial: Tensor
    transition: Tensor
    reward: Tensor
    terminal: Tensor
    horizon: int

    @property
    def num_states(self) -> int:
        """Number of states S."""
        return self.initial.shape[0]

    @property
    def num_actions(self) -> int:
        """Number of actions A."""
        return self.reward.shape[1]


def random_mdp(num_states: int = 4, num_actions: int = 2, horizon: int = 4, seed: int = 0) -> TabularMDP:
    """A random MDP whose last state is terminal; rewards uniform in [0, 1] (all positive, the notes' case
    where a baseline matters, docs/math.md §1)."""
    g = torch.Generator().manual_seed(seed)
    terminal = torch.zeros(num_states, dtype=torch.bool)
    terminal[-1] = True
    initial = torch.rand(num_states, generator=g, dtype=DTYPE) * (~terminal)
    initial = initial / initial.sum()
    transition = torch.rand(num_states, num_actions, num_states, generator=g, dtype=DTYPE) ** 2
    transition = transition / transition.sum(-1, keepdim=True)
    reward = torch.rand(num_states, num_actions, generator=g, dtype=DTYPE)
    return TabularMDP(initial, transition, reward, terminal, horizon)


@dataclass
class Trajectories:
    """A batch of trajectories, batch-major (N, H), right padded after the episode's end.

    states, actions: (N, H) int64; rewards: (N, H); mask: (N, H) 1 on real steps;
    terminated: (N, H) bool, True on the step that entered a terminal state;
    next_states: (N, H) int64, the state after each step.
    """

    states: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    terminated: Tensor
    next_states: Tensor


_ENUMERATIONS: dict[tuple, Trajectories] = {}


def enumerate_trajectories(mdp: TabularMDP) -> Trajectories:
    """Every trajectory with non-zero probability under some policy (all action sequences, all transitions).

    Cached on the MDP's contents (the enumeration is the slow part of every exact computation here).
    """
    key = (mdp.horizon, *(tuple(t.flatten().tolist()) for t in (mdp.initial, mdp.transition, mdp.reward, mdp.terminal)))
    if key not in _ENUMERATIONS:
        _ENUMERATIONS[key] = _enumerate(mdp)
    return _ENUMERATIONS[key]


def _enumerate(mdp: TabularMDP) -> Trajectories:
    rows: list[tuple[list[int], list[int], list[int], bool]] = []

    def extend(state: int, states: list[int], actions: list[int], next_states: list[int]) -> None:
        for a in range(mdp.num_actions):
            for s_next in range(mdp.num_states):
                if mdp.transition[state, a, s_next] == 0:
                    continue
                branch = (states + [state], actions + [a], next_states + [s_next])
                ended = bool(mdp.terminal[s_next])
                if ended or len(branch[1]) == mdp.horizon:
                    rows.append((*branch, ended))
                else:
                    extend(s_next, *branch)

    for s0 in range(mdp.num_states):
        if mdp.initial[s0] > 0:
            extend(s0, [], [], [])
    return _pack(mdp, rows)


def _pack(mdp: TabularMDP, rows: list[tuple[list[int], list[int], list[int], bool]]) -> Trajectories:
    n, h = len(rows), mdp.horizon
    states = torch.zeros(n, h, dtype=torch.int64)
    actions = torch.zeros(n, h, dtype=torch.int64)
    next_states = torch.zeros(n, h, dtype=torch.int64)
    mask = torch.zeros(n, h, dtype=DTYPE)
    terminated = torch.zeros(n, h, dtype=torch.bool)
    for i, (ss, aa, nn, ended) in enumerate(rows):
        length = len(aa)
        states[i, :length] = torch.tensor(ss[:length])
        actions[i, :length] = torch.tensor(aa)
        next_states[i, :length] = torch.tensor(nn)
        mask[i, :length] = 1.0
        if ended:
            terminated[i, length - 1] = True
    rewards = mdp.reward[states, actions] * mask
    return Trajectories(states, actions, rewards, mask, terminated, next_states)


def trajectory_log_probability(mdp: TabularMDP, logits: Tensor, batch: Trajectories) -> Tensor:
    """log P_theta(tau) = log rho_0(s_0) + sum_t [log pi_theta(a_t|s_t) + log P(s_{t+1}|s_t,a_t)] (docs/math.md §1)."""
    log_pi = torch.log_softmax(logits, -1)[batch.states, batch.actions]
    log_p = torch.log(mdp.transition[batch.states, batch.actions, batch.next_states])
    return torch.log(mdp.initial[batch.states[:, 0]]) + ((log_pi + log_p) * batch.mask).sum(-1)


def exact_objective(mdp: TabularMDP, logits: Tensor, gamma: float = 1.0) -> Tensor:
    """J(theta) = sum_tau P_theta(tau) R(tau), with R(tau) = sum_t gamma^t r_t, by enumeration (docs/math.md §1)."""
    batch = enumerate_trajectories(mdp)
    discounts = gamma ** torch.arange(mdp.horizon, dtype=DTYPE)
    returns = (batch.rewards * discounts).sum(-1)
    return (trajectory_log_probability(mdp, logits, batch).exp() * returns).sum()


def exact_policy_gradient(mdp: TabularMDP, logits: Tensor, gamma: float = 1.0) -> Tensor:
    """grad_theta J(theta), exactly: autograd through the enumerated sum over trajectories. Shape like logits."""
    theta = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_objective(mdp, theta, gamma), theta)
    return grad


def exact_values(mdp: TabularMDP, logits: Tensor, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Time-dependent V_t(s) (H+1, S) and Q_t(s, a) (H, S, A) of the policy, by backward induction.

    V_H = 0 (finite horizon) and the value of a terminal state is 0.
    """
    pi = torch.softmax(logits.detach(), -1)
    values = torch.zeros(mdp.horizon + 1, mdp.num_states, dtype=DTYPE)
    q = torch.zeros(mdp.horizon, mdp.num_states, mdp.num_actions, dtype=DTYPE)
    alive = (~mdp.terminal).to(DTYPE)
    for t in range(mdp.horizon - 1, -1, -1):
        q[t] = mdp.reward + gamma * mdp.transition @ (alive * values[t + 1])
        values[t] = (pi * q[t]).sum(-1)
    return values, q


def sample_trajectories(mdp: TabularMDP, logits: Tensor, num: int, generator: torch.Generator) -> Trajectories:
    """num trajectories from the policy softmax(logits), vectorised over the batch."""
    h = mdp.horizon
    pi = torch.softmax(logits.detach(), -1)
    states = torch.zeros(num, h, dtype=torch.int64)
    actions = torch.zeros(num, h, dtype=torch.int64)
    next_states = torch.zeros(num, h, dtype=torch.int64)
    mask = torch.zeros(num, h, dtype=DTYPE)
    terminated = torch.zeros(num, h, dtype=torch.bool)
    s = torch.multinomial(mdp.initial, num, replacement=True, generator=generator)
    alive = torch.ones(num, dtype=torch.bool)
    for t in range(h):
        a = torch.multinomial(pi[s], 1, generator=generator).squeeze(-1)
        s_next = torch.multinomial(mdp.transition[s, a], 1, generator=generator).squeeze(-1)
        states[:, t], actions[:, t], next_states[:, t] = s, a, s_next
        mask[:, t] = alive.to(DTYPE)
        terminated[:, t] = alive & mdp.terminal[s_next]
        alive = alive & ~mdp.terminal[s_next]
        s = s_next
    rewards = mdp.reward[states, actions] * mask
    return Trajectories(states, actions, rewards, mask, terminated, next_states)


ESTIMATORS: tuple[str, ...] = (
    "total_return", "reward_to_go", "reward_to_go_baseline", "q_value", "advantage", "td_residual",
    "gae_exact_critic", "gae_wrong_critic", "reward_to_go_discounted", "reward_to_go_discounted_gamma_t",
)


def policy_gradient_samples(mdp: TabularMDP, logits: Tensor, batch: Trajectories, estimator: str,
                            gamma: float = 1.0, gae_lambda: float = 0.9) -> Tensor:
    """Per-trajectory policy-gradient estimates g_n = sum_t psi_t grad log pi(a_t|s_t), shape (N, S, A).

    psi comes from advantage.objectives (psi / gae), the surrogate from `policy_gradient_loss` with the seeds'
    1/N sum_n sum_t normalisation. Each trajectory differentiates its own copy of theta, so one backward pass
    yields every g_n. Critics are exact (dynamic programming) except for "gae_wrong_critic", which uses
    V = 0.5 * V_exact to show that GAE with lambda < 1 is biased when the critic is wrong.
    Estimators "reward_to_go_discounted*" use `gamma` (the others are meant for gamma = 1): plain discounted
    reward-to-go, and the same weighted by gamma^t, which is the unbiased form for J_gamma.
    """
    n, h = batch.states.shape
    values_table, q_table = exact_values(mdp, logits, gamma)
    steps = torch.arange(h).expand(n, h)
    values = values_table[steps, batch.states] * batch.mask
    alive_next = (~batch.terminated).to(DTYPE) * (steps + 1 < h).to(DTYPE)
    next_values = values_table[(steps + 1).clamp(max=h), batch.next_states] * alive_next * batch.mask
    q_values = q_table[steps, batch.states, batch.actions] * batch.mask
    common = dict(terminated=batch.terminated, mask=batch.mask, dim=1)

    if estimator in ("total_return", "reward_to_go", "q_value", "advantage", "td_residual"):
        weights = psi(estimator, batch.rewards, gamma, values=values, next_values=next_values, q_values=q_values,
                      **common)
    elif estimator == "reward_to_go_baseline":
        weights = psi(estimator, batch.rewards, gamma, baseline=values, **common)
    elif estimator == "gae_exact_critic":
        weights = gae(batch.rewards, values, next_values, gamma, gae_lambda, **common)
    elif estimator == "gae_wrong_critic":
        weights = gae(batch.rewards, 0.5 * values, 0.5 * next_values, gamma, gae_lambda, **common)
    elif estimator == "reward_to_go_discounted":
        weights = psi("reward_to_go", batch.rewards, gamma, **common)
    elif estimator == "reward_to_go_discounted_gamma_t":
        weights = psi("reward_to_go", batch.rewards, gamma, **common) * gamma ** steps.to(DTYPE)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")

    theta = logits.detach().expand(n, *logits.shape).clone().requires_grad_(True)  # (N, S, A): one copy each
    log_probs = torch.log_softmax(theta[torch.arange(n).unsqueeze(-1), batch.states], -1)  # (N, H, A)
    log_probs = log_probs.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)  # (N, H)
    loss = policy_gradient_loss(log_probs, weights, batch.mask, aggregation="constant", constant_length=1.0)
    (grad,) = torch.autograd.grad(loss, theta)
    return -grad * n  # undo the 1/N and the sign: the ascent direction of trajectory n alone


@dataclass(frozen=True)
class EstimatorReport:
    """Monte Carlo mean of an estimator against the exact value.

    max_z: largest |mean - exact| / standard error over the components (large = biased).
    relative_bias: ||mean - exact|| / ||exact||.
    total_variance: trace of the covariance of single-sample estimates.
    """

    max_z: float
    relative_bias: float
    total_variance: float


def compare_to_exact(samples: Tensor, exact: Tensor) -> EstimatorReport:
    """Bias (in standard errors) and variance of per-sample estimates `samples` (N, ...) against `exact` (...)."""
    flat = samples.reshape(samples.shape[0], -1)
    target = exact.reshape(-1)
    mean = flat.mean(0)
    std_error = flat.std(0) / flat.shape[0] ** 0.5
    deviation = (mean - target).abs()
    # Components that never vary (e.g. the terminal state's logits) have no standard error: compare directly.
    z = torch.where(std_error > 1e-12, deviation / std_error.clamp(min=1e-12), deviation * 1e12)
    return EstimatorReport(float(z.max()), float((mean - target).norm() / target.norm().clamp(min=1e-12)),
                           float(flat.var(0).sum()))


def exact_moments(mdp: TabularMDP, logits: Tensor, estimator: str, gamma: float = 1.0,
                  gae_lambda: float = 0.9) -> tuple[Tensor, float]:
    """Exact mean E[g] and total variance E||g - E[g]||^2 of a per-trajectory estimator, by enumeration.

    The estimator is evaluated on every trajectory and weighted by P_theta(tau): no sampling error at all.
    """
    batch = enumerate_trajectories(mdp)
    probs = trajectory_log_probability(mdp, logits.detach(), batch).exp()  # (num_trajectories,)
    samples = policy_gradient_samples(mdp, logits, batch, estimator, gamma, gae_lambda).reshape(len(probs), -1)
    mean = (probs.unsqueeze(-1) * samples).sum(0)
    variance = float((probs * ((samples - mean) ** 2).sum(-1)).sum())
    return mean.reshape(logits.shape), variance


def relative_error(value: Tensor, target: Tensor) -> float:
    """||value - target|| / ||target||."""
    return float((value - target).norm() / target.norm().clamp(min=1e-12))


# ---------------------------------------------------------------------------------------------------------
# DPO on an enumerable response space (docs/math.md §6)

@dataclass
class PreferenceProblem:
    """Prompts x in range(X), responses y in range(Y), a reference policy and a true reward.

    ref_logits: (X, Y); reward: (X, Y); beta: the KL coefficient.
    """

    ref_logits: Tensor
    reward: Tensor
    beta: float

    def optimal_policy(self) -> Tensor:
        """pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) (docs/math.md §6), shape (X, Y)."""
        return torch.softmax(torch.log_softmax(self.ref_logits, -1) + self.reward / self.beta, -1)


def random_preference_problem(num_prompts: int = 2, num_responses: int = 4, beta: float = 0.5,
                              seed: int = 0) -> PreferenceProblem:
    """Random reference logits and rewards (standard normal)."""
    g = torch.Generator().manual_seed(seed)
    return PreferenceProblem(torch.randn(num_prompts, num_responses, generator=g, dtype=DTYPE),
                             torch.randn(num_prompts, num_responses, generator=g, dtype=DTYPE), beta)


def sample_rankings(problem: PreferenceProblem, num: int, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rankings of k distinct responses drawn from the Plackett-Luce model of the true reward (k = 2: Bradley-Terry).

    The responses are a uniform random k-subset; ordering them by r + Gumbel noise samples Plackett-Luce exactly.
    Returns (prompts (num,), ranked responses (num, k), best first).
    """
    x, y = problem.reward.shape
    prompts = torch.randint(0, x, (num,), generator=generator)
    subsets = torch.rand(num, y, generator=generator, dtype=DTYPE).argsort(-1)[:, :k]
    uniform = torch.rand(num, k, generator=generator, dtype=DTYPE).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(uniform))
    order = (problem.reward[prompts.unsqueeze(-1), subsets] + gumbel).argsort(-1, descending=True)
    return prompts, subsets.gather(-1, order)


def train_tabular_dpo(problem: PreferenceProblem, prompts: Tensor, ranked: Tensor, steps: int = 300,
                      loss: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> Tensor:
    """Fit tabular policy logits (X, Y) with DPO; returns pi_theta.

    loss: "sigmoid" (pairwise DPO for k = 2, with `label_smoothing` conservative DPO; Plackett-Luce for k > 2),
    "ipo" or "simpo" (k = 2; SimPO with target margin `simpo_gamma`, every answer one token long, no reference).
    The policy starts at pi_ref. log pi(y|x) = theta_xy - logsumexp_y theta_x, so each loss is convex
    in theta and L-BFGS converges to the empirical optimum.
    """
    if loss not in ("sigmoid", "ipo", "simpo"):
        raise ValueError(f"loss must be 'sigmoid', 'ipo' or 'simpo', got {loss!r}")
    if (loss != "sigmoid" or ranked.shape[1] > 2) and label_smoothing:
        raise ValueError("label_smoothing applies to the pairwise sigmoid loss only")
    if loss != "sigmoid" and ranked.shape[1] != 2:
        raise ValueError(f"{loss} compares pairs: rankings of 2 answers")
    theta = problem.ref_logits.clone().requires_grad_(True)
    ref_log_probs = torch.log_softmax(problem.ref_logits, -1)[prompts.unsqueeze(-1), ranked]
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        policy_log_probs = torch.log_softmax(theta, -1)[prompts.unsqueeze(-1), ranked]
        pair = (policy_log_probs[:, 0], policy_log_probs[:, 1], ref_log_probs[:, 0], ref_log_probs[:, 1])
        if ranked.shape[1] > 2:
            value, _ = plackett_luce_dpo_loss(policy_log_probs, ref_log_probs, problem.beta)
        elif loss == "ipo":
            value, _ = ipo_loss(*pair, problem.beta)
        elif loss == "simpo":
            one_token = torch.ones(len(prompts))
            value, _ = simpo_loss(pair[0], pair[1], one_token, one_token, problem.beta, simpo_gamma)
        else:
            value, _ = dpo_loss(*pair, problem.beta, label_smoothing)
        value.backward()
        return value

    optimizer.step(closure)
    return torch.softmax(theta.detach(), -1)


def total_variation(p: Tensor, q: Tensor) -> float:
    """Largest total-variation distance 1/2 sum_y |p(y|x) - q(y|x)| over the prompts x."""
    return float(0.5 * (p - q).abs().sum(-1).max())


# ---------------------------------------------------------------------------------------------------------
# KL estimators' gradients, exactly (k3 and its relatives, docs/math.md §4)

def expected_kl_gradient(logits: Tensor, ref_logits: Tensor, estimator: KLEstimator, placement: KLPlacement) -> Tensor:
    """E_{a ~ pi}[g(a)]: the expected gradient (w.r.t. the logits) that one sample's KL term contributes.

    placement "reward": the penalty -k(a) enters as a reward through the policy gradient, loss = -psi log pi(a);
    "loss": loss = k(a); "loss_weighted": loss = pi(a)/pi_old(a) k(a) with pi_old = pi at sampling time.
    The expectation is taken exactly by enumerating the actions with weights pi(a) held constant.
    """
    theta = logits.detach().clone().requires_grad_(True)
    log_probs = torch.log_softmax(theta, -1)
    ref_log_probs = torch.log_softmax(ref_logits.detach(), -1)
    if placement == "reward":
        penalty = kl_reward_penalty(log_probs, ref_log_probs, 1.0, estimator)  # psi = -k(a), detached
        per_action = -penalty * log_probs  # the policy-gradient loss -psi log pi(a)
    elif placement == "loss":
        per_action = kl_loss_term(log_probs, ref_log_probs, 1.0, estimator)
    elif placement == "loss_weighted":
        per_action = kl_loss_term(log_probs, ref_log_probs, 1.0, estimator, old_log_probs=log_probs.detach())
    else:
        raise ValueError(f"unknown placement {placement!r}")
    weights = log_probs.detach().exp()
    (grad,) = torch.autograd.grad((weights * per_action).sum(), theta)
    return grad


def exact_kl_gradient(logits: Tensor, ref_logits: Tensor, reverse: bool = False) -> Tensor:
    """grad_theta KL(pi_theta || pi_ref) (or KL(pi_ref || pi_theta) if `reverse`), by autograd."""
    theta = logits.detach().clone().requires_grad_(True)
    kl = categorical_kl(ref_logits, theta) if reverse else categorical_kl(theta, ref_logits)
    (grad,) = torch.autograd.grad(kl.sum(), theta)
    return grad


def all_permutations(k: int) -> Tensor:
    """Every ordering of range(k), shape (k!, k)."""
    return torch.tensor(list(itertools.permutations(range(k))))
