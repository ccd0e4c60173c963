"""RLHF on the token MDP (docs/math.md §5): KL-shaped per-token rewards and the PPO-ptx pretraining term.

The notes' objective for the policy pi_phi^RL, starting from the SFT model pi^SFT (docs/math.md §5):

    objective(phi) = E_{(x,y) ~ pi_phi^RL}[ r_theta(x, y) - beta log(pi_phi^RL(y|x) / pi^SFT(y|x)) ]
                     + gamma E_{x ~ D_pretrain}[ log pi_phi^RL(x) ]

With the token as the action (docs/math.md §5), log(pi/pi_SFT)(y|x) = sum_t log(pi/pi_SFT)(y_t | x, y_<t), so the
KL penalty is spread over the tokens while the reward model scores only the whole answer, i.e. its last token.
PPO (advantage.objectives.ppo) then maximises the return of these per-token rewards, with GAE over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from advantage.objectives.kl import KLEstimator, kl_loss_term, kl_reward_penalty
from advantage.objectives.masking import Aggregation, aggregate, fill_padding, masked_whiten
from advantage.objectives.returns import gae, shift_to_next


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row of a right-padded (B, T) mask; rows with none give 0."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.to(torch.bool), positions, torch.zeros_like(positions)).amax(dim=-1)


def terminal_at_last_token(mask: Tensor) -> Tensor:
    """(B, T) bool, True at the last real token of each row: a completion's end is a terminal state (docs/math.md §2).

    Pass it as `terminated` to the return and GAE functions along the token axis (dim=1).
    """
    ends = torch.zeros_like(mask, dtype=torch.bool)
    has_tokens = mask.to(torch.bool).any(dim=-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    ends[rows, last_token_index(mask)] = has_tokens
    return ends


def shaped_token_rewards(scores: Tensor, log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor, beta: float,
                         estimator: KLEstimator = "k1") -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: r_t = -beta k_t on every answer token, plus r_theta(x, y) on the last one
    (docs/math.md §5).

    Args:
        scores: (B,) reward-model scores r_theta(x, y) of whole answers.
        log_probs: (B, T) log pi(y_t | x, y_<t) of the sampled answer tokens under the policy at sampling time.
        ref_log_probs: (B, T) the same under the frozen reference (SFT) model.
        mask: (B, T), 1 on answer tokens (right padded).
        beta: KL coefficient.
        estimator: "k1" (default) is log(pi/pi_ref), the seed's term, and the placement-in-the-reward
            estimator whose policy gradient is unbiased for grad KL (advantage.objectives.kl).
    Returns:
        (rewards (B, T) with padding 0, per-token KL estimates (B, T) for logging).
    """
    penalty = fill_padding(kl_reward_penalty(log_probs, ref_log_probs, beta, estimator), mask)
    rewards = penalty.clone()
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    # An answer with no token (all padding) gets no score: selected away, never multiplied by 0.
    has_token = mask.to(torch.bool)[rows, last]
    rewards[rows, last] = rewards[rows, last] + fill_padding(scores.detach().to(rewards.dtype), has_token)
    kl = penalty / -beta if beta != 0 else torch.zeros_like(penalty)
    return rewards, kl


def ptx_loss(pretrain_log_probs: Tensor, mask: Tensor | None, coefficient: float,
             aggregation: Aggregation = "token", constant_length: float | None = None) -> Tensor:
    """PPO-ptx term as a loss, -gamma E_{x ~ D_pretrain}[log pi(x)] (the notes' "+ gamma E[log pi^RL(x)]",
    docs/math.md §5).

    Args:
        pretrain_log_probs: (B, T) per-token log pi(x_t | x_<t) on pretraining text.
        coefficient: gamma (the seed's pretraining weight, not the discount).
        aggregation: "token" averages over tokens (the usual language-model loss scale); "constant" with
            constant_length=1 sums each sequence, exactly the seed's E_x[log pi(x)].
    """
    return -coefficient * aggregate(pretrain_log_probs, mask, aggregation, constant_length)


def kl_penalty_loss(log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor, beta: float,
                    estimator: KLEstimator = "k2", num_tokens: float | Tensor | None = None) -> Tensor:
    """The KL as a loss term instead of a reward (placement "loss"): beta sum_{b,t} m k(a_t) / num_tokens.

    The per-token `kl.kl_loss_term`, differentiated pathwise (unbiased for grad KL with k2; docs/math.md §4,
    "KL placement"), averaged over the real tokens like the policy loss it joins.

    Args:
        log_probs: (B, T) log pi(a_t | s_t) of the sampled answer tokens, differentiable.
        ref_log_probs: (B, T) the same under the frozen reference.
        mask: (B, T), 1 on answer tokens.
        num_tokens: the real tokens of the whole batch when this is one minibatch share of it (default: this
            batch's).
    """
    return aggregate(kl_loss_term(log_probs, ref_log_probs, beta, estimator), mask, "token", num_tokens=num_tokens)


def advantages_and_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float,
                           whiten: bool) -> tuple[Tensor, Tensor]:
    """GAE over each answer's tokens (docs/math.md §2), the answer's end a terminal state; returns = A + V (the
    critic's lambda-return target); the advantages optionally whitened over the batch.

    Args:
        rewards, values, mask: (N, A) per answer token.
    """
    ends = terminal_at_last_token(mask)
    next_values = shift_to_next(values, dim=1)  # V(s_{t+1}); ignored after the terminal token
    advantages, returns = gae(rewards, values, next_values, gamma, gae_lambda, terminated=ends, mask=mask, dim=1,
                              with_returns=True)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns
