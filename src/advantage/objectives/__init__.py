"""The seeds' mathematics as pure tensor functions, shared by the classic and the language-model algorithms.

Modules, in the order the seeds derive them:
    returns          R(tau), reward-to-go, n-step returns, TD residual, GAE
    policy_gradient  the six psi forms, the REINFORCE surrogate, advantage normalisation, critic losses
    ppo              importance sampling, L^CPI, PPO-clip, PPO-penalty and its adaptive beta
    trust_region     TRPO: Fisher-vector product, conjugate gradient, natural step, line search
    kl               exact KL, the k1/k2/k3 estimators and their placements, entropy
    preference       Bradley-Terry, K-wise, Plackett-Luce reward losses; pairwise and listwise DPO,
                     conservative DPO, IPO, hinge, SimPO; RPO's NLL term; reward centring
    grpo             group-normalised advantages (RLOO's leave-one-out baseline too) and the GRPO loss
                     (GSPO's sequence ratio too)
    rlhf             KL-shaped per-token rewards and the PPO-ptx term
    masking          masked reductions and the loss aggregation modes
docs/math.md maps every seed formula to its function and its test.
"""

from advantage.objectives.grpo import (
    answer_kl_penalty,
    group_normalized_advantages,
    grpo_loss,
    leave_one_out_baseline,
    sequence_importance_ratio,
)
from advantage.objectives.kl import (
    categorical_entropy,
    categorical_kl,
    gaussian_entropy,
    gaussian_kl,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss_term,
    kl_reward_penalty,
)
from advantage.objectives.masking import aggregate, fill_padding, masked_mean, masked_sum, masked_var, masked_whiten
from advantage.objectives.policy_gradient import (
    clipped_value_loss,
    explained_variance,
    normalize_advantages,
    policy_gradient_loss,
    psi,
    value_loss,
)
from advantage.objectives.ppo import (
    adaptive_kl_beta,
    clipped_surrogate_loss,
    clipped_surrogate_terms,
    cpi_loss,
    importance_ratio,
    importance_sampling_estimate,
    kl_penalty_surrogate_loss,
    surrogate_stats,
)
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
from advantage.objectives.returns import (
    discounted_returns,
    episode_return_per_step,
    gae,
    n_step_advantage,
    n_step_returns,
    shift_to_next,
    td_residual,
    total_return,
)
from advantage.objectives.rlhf import (
    kl_penalty_loss,
    last_token_index,
    ptx_loss,
    shaped_token_rewards,
    terminal_at_last_token,
)
from advantage.objectives.trust_region import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    natural_gradient_step,
)

__all__ = [
    "adaptive_kl_beta", "aggregate", "answer_kl_penalty", "backtracking_line_search", "bradley_terry_loss",
    "bradley_terry_probability", "categorical_entropy", "categorical_kl", "chosen_nll_loss", "clipped_surrogate_loss",
    "clipped_surrogate_terms", "clipped_value_loss", "conjugate_gradient", "cpi_loss", "discounted_returns",
    "dpo_implicit_rewards", "dpo_loss", "episode_return_per_step", "explained_variance", "fill_padding",
    "fisher_vector_product", "flat_grad", "gae", "gaussian_entropy", "gaussian_kl", "group_normalized_advantages",
    "grpo_loss", "hinge_dpo_loss", "importance_ratio", "importance_sampling_estimate", "ipo_loss", "kl_estimate",
    "kl_k1", "kl_k2", "kl_k3", "kl_loss_term", "kl_penalty_loss", "kl_penalty_surrogate_loss", "kl_reward_penalty",
    "kwise_pairwise_loss", "last_token_index", "leave_one_out_baseline", "masked_mean", "masked_sum", "masked_var",
    "masked_whiten", "n_step_advantage", "n_step_returns", "natural_gradient_step", "normalize_advantages",
    "plackett_luce_dpo_loss", "plackett_luce_log_likelihood", "plackett_luce_loss", "policy_gradient_loss", "psi",
    "ptx_loss", "reward_centering_loss", "sequence_importance_ratio", "shaped_token_rewards", "shift_to_next",
    "simpo_loss", "surrogate_stats", "td_residual", "terminal_at_last_token", "total_return", "value_loss",
]
