"""RLHF with PPO (seeds 000, 001, 003): the policy maximises a reward model's score minus a KL to the SFT model.

Seed 000's objective, for the policy pi^RL starting from the SFT model pi^SFT (the frozen reference):

    objective(phi) = E_{(x, y) ~ pi^RL}[ r_theta(x, y) - beta log(pi^RL(y|x) / pi^SFT(y|x)) ]
                     + gamma E_{x ~ D_pretrain}[ log pi^RL(x) ]                                  (PPO-ptx)

On the token MDP (seed 003: state = prefix, action = next token, deterministic transition) the KL term splits over
the tokens, and the reward model scores only the finished answer, so each answer token t gets the reward

    r_t = -beta k(a_t)  (+ r_theta(x, y) at the last token),     k = log pi^RL / pi^SFT (k1) by default

(`objectives.rlhf.shaped_token_rewards`). A value model V(s_t) estimates the return from each prefix; GAE over the
answer's tokens (seed 003: A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) - V(s_t),
`objectives.returns.gae`) gives the advantages, whitened over the batch; PPO's clipped surrogate (seed 004,
`objectives.ppo.clipped_surrogate_loss`) updates the policy and the clipped squared error
(`objectives.policy_gradient.clipped_value_loss`) the value model, over several epochs of minibatches. The KL
coefficient is fixed, or adapted towards `target_kl` by seed 004's rule (`objectives.ppo.adaptive_kl_beta`: halve
it below target / 1.5, double it above target x 1.5). With `ptx_coef` > 0 the PPO-ptx term -gamma E[log pi(x)] on
`ptx_data` joins the policy's loss (`objectives.rlhf.ptx_loss`).

The value model is separate by default: a scalar head on its own copy of a transformer body, initialised from the
reward model when one is given (InstructGPT's choice: the reward model already knows what a good answer looks like)
and otherwise from the policy. Keeping it separate means the value loss never pulls on the policy's weights, so no
coefficient has to balance the two; it costs a second body in memory and in compute. `value_model shared` puts a
value head on the policy's own body instead (one body in memory; the value loss, weighted by `vf_coef`, then
shapes the policy's features too).

The KL may instead go in the loss (`kl_placement loss`: beta k(a) added per token, differentiated), with k1, k2 or k3;
the default (reward, k1) is the combination whose policy gradient is unbiased (docs/math.md, "KL placement").

metrics.jsonl (`step` = optimizer steps): the names docs/metrics.md gives rlhf (eval/ on rank 0).

final/ is the trained policy in Hugging Face format; final/value_model/ the value model (ScalarHeadModel format).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from advantage.lm.config import mixed_precision
from advantage.lm.data import load_rows, sft_pairs
from advantage.lm.data_order import DataOrder, fingerprint
from advantage.lm.examples import collate_examples, tokenize_pairs
from advantage.lm.generation import generate
from advantage.lm.loading import add_lora, end_ids, load_policy, max_length, pad_id
from advantage.lm.logprobs import SharedPromptBatch, answer_log_probs, collate_shared_prompt, masked_log_probs
from advantage.lm.models import ScalarHeadModel, evaluation_mode
from advantage.lm.online import OnlineConfig, Scorer, evaluate, groups_of, load_prompts, validate_online
from advantage.lm.schedule import learning_rate_at, make_optimizer
from advantage.lm.session import LMSession, StepWindow
from advantage.objectives.kl import KL_ESTIMATORS, kl_estimate, kl_loss_term
from advantage.objectives.masking import aggregate, fill_padding, masked_whiten
from advantage.objectives.policy_gradient import clipped_value_loss, explained_variance
from advantage.objectives.ppo import adaptive_kl_beta, clipped_surrogate_loss
from advantage.objectives.returns import gae, shift_to_next
from advantage.objectives.rlhf import ptx_loss, shaped_token_rewards, terminal_at_last_token
from advantage.run.config import param, require
from advantage.run.seeding import INDEX_STRIDE, derive_seed
from advantage.run.session import Run


@dataclass
class RLHFConfig(OnlineConfig):
    """RLHF-PPO's hyperparameters: the online fields (batch_size = prompts per rollout) and PPO's."""

    # Old names that still work, with a notice: one vocabulary across the library (docs/math.md, "Names").
    RENAMED: ClassVar[dict[str, str]] = {"ppo_epochs": "update_epochs", "lam": "gae_lambda", "kl_coef": "beta",
                                         "whiten_advantages": "normalize_advantage"}

    samples_per_prompt: int = param(1, "answers sampled per prompt in a rollout")
    update_epochs: int = param(4, "passes over each rollout")
    num_minibatches: int = param(1, "optimizer steps per pass (the rollout's prompts split evenly)")
    clip_range: float = param(0.2, "epsilon of the clipped policy ratio")
    value_clip_range: float = param(0.2, "how far a value may move from its rollout value before clipping")
    gamma: float = param(1.0, "discount over the answer's tokens")
    gae_lambda: float = param(0.95, "GAE lambda")
    beta: float = param(0.05, "the KL coefficient (initial value when target_kl > 0)")
    target_kl: float = param(0.0, "adapt beta towards this KL per answer with the 1.5x rule (0: fixed beta)")
    kl_estimator: Literal["k1", "k2", "k3"] = param("k1", "per-token KL estimator (k1 = log pi / pi_ref, seed 000)")
    kl_placement: Literal["reward", "loss"] = param("reward", "KL folded into the token rewards (seed 000), or a "
                                                              "loss term")
    normalize_advantage: bool = param(True, "standardise the advantages over the rollout")
    value_model: Literal["separate", "shared"] = param(
        "separate", "separate: a value model of its own (from the reward model if given, else a copy of the "
                    "policy); shared: a value head on the policy's body, the value loss (x vf_coef) added to its "
                    "gradient")
    vf_coef: float = param(0.1, "weight of the value loss in the shared body's gradient (value_model shared)")
    value_learning_rate: float = param(0.0, "AdamW learning rate of the value model (0: learning_rate)")
    ptx_coef: float = param(0.0, "gamma of PPO-ptx: weight of the pretraining log-likelihood (0: off)")
    ptx_data: str = param("", "pretraining data for PPO-ptx (sft rows: prompt/completion, text or messages)")
    ptx_batch_size: int = param(8, "pretraining examples per optimizer step")
    learning_rate: float = param(1e-5, "AdamW peak learning rate of the policy")
    batch_size: int = param(16, "prompts per rollout")


CONFIG = RLHFConfig


def validate(config: RLHFConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_online(config)
    require(config.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1", config.samples_per_prompt)
    require(config.update_epochs >= 1, "update_epochs", "must be >= 1", config.update_epochs)
    require(config.num_minibatches >= 1, "num_minibatches", "must be >= 1", config.num_minibatches)
    require(config.batch_size % config.num_minibatches == 0, "num_minibatches",
            f"must divide batch_size ({config.batch_size})", config.num_minibatches)
    require(config.clip_range > 0, "clip_range", "must be > 0", config.clip_range)
    require(config.value_clip_range >= 0, "value_clip_range", "must be >= 0", config.value_clip_range)
    require(0 <= config.gamma <= 1, "gamma", "must be in [0, 1]", config.gamma)
    require(0 <= config.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]", config.gae_lambda)
    require(config.beta >= 0 and math.isfinite(config.beta), "beta", "must be >= 0", config.beta)
    require(config.target_kl >= 0, "target_kl", "must be >= 0", config.target_kl)
    require(not (config.target_kl > 0 and config.beta == 0), "beta", "must be > 0 to adapt towards target_kl",
            config.beta)
    require(config.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {KL_ESTIMATORS}",
            config.kl_estimator)
    require(config.value_learning_rate >= 0, "value_learning_rate", "must be >= 0", config.value_learning_rate)
    require(config.ptx_coef >= 0, "ptx_coef", "must be >= 0", config.ptx_coef)
    require(not (config.ptx_coef > 0 and not config.ptx_data), "ptx_data", "is required when ptx_coef > 0",
            config.ptx_data)
    require(config.ptx_batch_size >= 1, "ptx_batch_size", "must be >= 1", config.ptx_batch_size)
    require(config.vf_coef >= 0, "vf_coef", "must be >= 0", config.vf_coef)


# --------------------------------------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """One batch of sampled answers and everything PPO needs of it, per answer token (B * K rows, A columns)."""

    prompt_ids: list[list[int]]
    groups: list[list[list[int]]]
    old_log_probs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    mask: Tensor

    def rows_of(self, prompts: list[int], per_prompt: int) -> Tensor:
        """The answer rows of the given prompts (row b * K + k is answer k of prompt b)."""
        return torch.tensor([b * per_prompt + k for b in prompts for k in range(per_prompt)], dtype=torch.long)


@torch.no_grad()
def _without_grad(model: nn.Module, compute):
    """compute(model) in eval mode without a graph, the model's mode restored after."""
    with evaluation_mode(model):
        result = compute(model)
    return result


def advantages_and_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float,
                           whiten: bool) -> tuple[Tensor, Tensor]:
    """GAE over each answer's tokens (seed 003), the answer's end a terminal state; returns = A + V (the critic's
    lambda-return target); the advantages optionally whitened over the batch.

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


# ---------------------------------------------------------------------------------------------------------- training


def train(config: RLHFConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Fine-tune `config.model` with RLHF-PPO on the prompts of `config.data` (or the built-in task).

    Returns:
        The Run, whose `.model` is the trained causal LM as saved in final/.
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    session = LMSession("rlhf", config, run_dir, resume)
    processes = session.processes
    share = config.batch_size // processes.world_size
    require(share % config.num_minibatches == 0, "num_minibatches",
            f"must divide each process's prompts ({share} = batch_size / {processes.world_size} processes)",
            config.num_minibatches)

    # The policy and its frozen reference (the SFT model: a copy, or the base model with LoRA's adapters off), the
    # reward (a frozen reward model or functions) and the value model (from the reward model, else the policy).
    model, tokenizer = load_policy(config)
    pad, ends, length = pad_id(tokenizer), end_ids(tokenizer, model), max_length(config, model)
    train_prompts, eval_prompts = load_prompts(config, session.run_dir, tokenizer, length)
    scorer = Scorer(config, tokenizer, ends)
    if scorer.model is not None:
        scorer.model.requires_grad_(False)
    ptx_examples = []
    if config.ptx_coef > 0:
        ptx_examples, _ = tokenize_pairs(sft_pairs(load_rows(config.ptx_data, "sft"), tokenizer), tokenizer, length,
                                         ends)
    reference = None if config.lora_r else copy.deepcopy(model).eval().requires_grad_(False)
    if config.value_model == "separate":  # its own body, copied before any adapter
        value_model = copy.deepcopy(scorer.model) if scorer.model is not None else \
            ScalarHeadModel.from_causal_lm(model, seed=config.seed)
        value_model.requires_grad_(True)
    if config.lora_r:
        model = add_lora(model, config)
    if config.value_model == "shared":  # a head on the policy's own body (its adapters, with LoRA)
        body = (model.get_base_model() if config.lora_r else model).base_model
        value_model = ScalarHeadModel(body, seed=config.seed)
    value_model.train()
    # What the value optimizer steps: the whole separate model, or only the head on the shared body (whose
    # gradients, the value loss's included, the policy's optimizer steps).
    value_parameters = list(value_model.head.parameters() if config.value_model == "shared" else
                            value_model.parameters())
    model.train()
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    value_optimizer = torch.optim.AdamW(value_parameters, lr=config.value_learning_rate or config.learning_rate,
                                        weight_decay=config.weight_decay)
    per_rollout = config.update_epochs * config.num_minibatches
    rounds = -(-config.max_steps // per_rollout) if config.max_steps else \
        max(1, math.ceil(config.epochs * len(train_prompts) / config.batch_size))
    steps = config.max_steps or rounds * per_rollout
    order = DataOrder(len(train_prompts), config.batch_size, config.seed, processes.rank, processes.world_size)
    state = session.start(model, optimizer, steps, fingerprint([prompt.ids for prompt in train_prompts]))
    beta = config.beta
    if state is not None:
        value_model.load_state_dict(state["value_model"])
        value_optimizer.load_state_dict(state["value_optimizer"])
        beta = float(state["kl_coef"])
    evaluating = bool(eval_prompts) and processes.is_main
    max_norm = config.max_grad_norm or math.inf
    step = session.start_step
    last: dict = {}
    window = StepWindow()
    per_prompt = config.samples_per_prompt
    checkpoint_pending = False

    def reference_log_probs(batch: SharedPromptBatch) -> Tensor:
        if reference is not None:
            return _without_grad(reference, lambda m: answer_log_probs(m, batch, config.temperature))
        with model.disable_adapter():
            return _without_grad(model, lambda m: answer_log_probs(m, batch, config.temperature))

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, eval_prompts, scorer, config, pad)

    if step == 0 and evaluating:
        last = session.metrics.log(0, session.elapsed(), held_out())
    while step < steps:
        began = time.perf_counter()
        round_index = step // per_rollout

        # 1. Sample answers to this process's prompts from the current policy.
        prompts = [train_prompts[index] for index in order.batch(round_index)]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, round_index, processes.rank))
        with mixed_precision(config):
            generated = generate(model, [prompt.ids for prompt in prompts], samples_per_prompt=per_prompt,
                                 max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                                 eos_id=ends, pad_id=pad, temperature=config.temperature, top_k=config.top_k,
                                 top_p=config.top_p, generator=generator)
        generation_s = time.perf_counter() - began
        trained = time.perf_counter()

        # 2. Score them; log pi_old, log pi_ref and V_old per answer token.
        scores, reward_logs = scorer(prompts, generated)
        groups = groups_of(generated.completions, per_prompt)
        prompt_ids = [prompt.ids for prompt in prompts]
        batch = collate_shared_prompt(prompt_ids, groups, pad)
        mask = batch.answer_mask
        with mixed_precision(config):
            old_log_probs = _without_grad(model, lambda m: answer_log_probs(m, batch, config.temperature))
            ref_log_probs = reference_log_probs(batch)
            old_values = _without_grad(value_model, lambda m: m.answer_values(batch)).float()

        # 3. Per-token rewards: -beta k(a_t) on every token (in the reward placement), the score at the last one.
        rewards, kl = shaped_token_rewards(scores, old_log_probs, ref_log_probs, mask,
                                           beta if config.kl_placement == "reward" else 0.0, config.kl_estimator)
        if config.kl_placement != "reward" or beta == 0:
            kl = fill_padding(kl_estimate(old_log_probs, ref_log_probs, config.kl_estimator), mask)
        sequence_kl = float(kl.sum(dim=1).mean())
        # 6 (decided now, applied to the next rollout). The adaptive KL coefficient: seed 004's 1.5x rule.
        next_beta = adaptive_kl_beta(beta, processes.sum(sequence_kl)[0] / processes.world_size,
                                     config.target_kl) if config.target_kl > 0 else beta

        # 4. GAE over tokens; the returns are the value model's targets.
        advantages, returns = advantages_and_returns(rewards, old_values, mask, config.gamma, config.gae_lambda,
                                                     config.normalize_advantage)
        rollout = Rollout(prompt_ids, groups, old_log_probs, old_values, advantages, returns, mask)
        training_s = time.perf_counter() - trained

        # 5. PPO: update_epochs passes, each over num_minibatches minibatches of prompts, one optimizer step each.
        shuffle = torch.Generator().manual_seed(config.seed * INDEX_STRIDE + round_index)  # its own stream
        for _ in range(config.update_epochs):
            permutation = torch.randperm(len(prompts), generator=shuffle).tolist()
            size = len(prompts) // config.num_minibatches
            for start in range(0, len(prompts), size):
                if step >= steps:
                    break
                trained = time.perf_counter()
                learning_rate = learning_rate_at(config, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate
                with mixed_precision(config):
                    figures = ppo_step(model, value_model, rollout, permutation[start:start + size], config, beta,
                                       ref_log_probs, ptx_examples, step, pad, processes)
                loss = figures["losses/policy"] + figures["losses/ptx"]
                if window.optimizer_step(session, optimizer, loss, max_norm):  # both skip a non-finite step
                    nn.utils.clip_grad_norm_(value_parameters, max_norm)
                    value_optimizer.step()
                value_optimizer.zero_grad(set_to_none=True)
                step += 1
                training_s += time.perf_counter() - trained
                window.end_step(int(figures.pop("tokens")), generation_s + training_s)
                if step % config.log_every == 0 or step == steps or (evaluating and session.evaluation_due(step)):
                    logged = {**window.figures("losses/total"), **figures,
                              **_rollout_logs(scores, rewards, reward_logs, sequence_kl, beta, generated,
                                              processes),
                              "time/generation_s": generation_s, "time/training_s": training_s,
                              "charts/learning_rate": learning_rate,
                              "charts/skipped_updates": session.skipped_updates}
                    if evaluating and session.evaluation_due(step):
                        logged.update(held_out())
                    last = session.metrics.log(step, session.elapsed(), logged)
                    session.show(step, {"score": logged["rewards/score"], "kl": sequence_kl})
                    window = StepWindow()
                # A checkpoint waits for the end of the rollout: a resumed run starts with a fresh rollout.
                checkpoint_pending = checkpoint_pending or session.checkpoint_due(step)
                if checkpoint_pending and (step % per_rollout == 0 or step == steps):
                    session.save(step, {"data_order": order.state(round_index + 1),
                                        "value_model": value_model.state_dict(),
                                        "value_optimizer": value_optimizer.state_dict(), "kl_coef": next_beta})
                    checkpoint_pending = False
                generation_s, training_s = 0.0, 0.0
        beta = next_beta

    model = session.finish(model, tokenizer, step)
    if processes.is_main:
        value_model.save_pretrained(session.run_dir / "final" / "value_model")
    return Run(session.run_dir, "rlhf", config, last, step, model, tokenizer)


def ppo_step(model: nn.Module, value_model: ScalarHeadModel, rollout: Rollout, prompts: list[int],
             config: RLHFConfig, beta: float, ref_log_probs: Tensor, ptx_examples: list, step: int, pad: int,
             processes) -> dict[str, float]:
    """Accumulate the gradients of one minibatch (the rollout's `prompts`) in the policy and the value model.

    Losses are token means over the minibatch of every process (its real tokens counted first), so that the
    gradients summed over processes are those of one process with the whole minibatch.
    """
    rows = rollout.rows_of(prompts, config.samples_per_prompt)
    batch = collate_shared_prompt([rollout.prompt_ids[b] for b in prompts],
                                  [rollout.groups[b] for b in prompts], pad)
    mask = batch.answer_mask
    width = mask.shape[1]

    def picked(tensor: Tensor) -> Tensor:  # the minibatch's rows, cut to its own answer width
        return tensor[rows][:, :width]

    num_tokens = processes.sum(float(mask.sum()))[0]
    log_probs = answer_log_probs(model, batch, config.temperature)
    old_log_probs = picked(rollout.old_log_probs)
    policy_loss, stats = clipped_surrogate_loss(log_probs, old_log_probs, picked(rollout.advantages),
                                                config.clip_range, mask, num_tokens=num_tokens)
    if config.kl_placement == "loss" and beta > 0:
        kl_terms = kl_loss_term(log_probs, picked(ref_log_probs), beta, config.kl_estimator)
        policy_loss = policy_loss + aggregate(kl_terms, mask, "token", num_tokens=num_tokens)
    ptx = torch.zeros(())
    if config.ptx_coef > 0:
        # PPO-ptx (seed 000): + gamma E_{x ~ D_pretrain}[log pi(x)], as a loss, on a batch that cycles the data.
        start = (step * config.ptx_batch_size) % len(ptx_examples)
        chosen = [ptx_examples[(start + i) % len(ptx_examples)] for i in range(config.ptx_batch_size)]
        pretraining = collate_examples(chosen, pad)
        pretrain_log_probs = masked_log_probs(model, pretraining.input_ids, pretraining.attention_mask,
                                              pretraining.position_ids, pretraining.loss_mask)
        ptx = ptx_loss(pretrain_log_probs, pretraining.loss_mask, config.ptx_coef) / processes.world_size
    (policy_loss + ptx).backward()

    values = value_model.answer_values(batch).float()
    value_loss = clipped_value_loss(values, picked(rollout.old_values), picked(rollout.returns),
                                    config.value_clip_range, mask, num_tokens=num_tokens)
    shared = config.value_model == "shared"
    (value_loss * (config.vf_coef if shared else 1.0)).backward()  # shared: into the policy's body too
    processes.sum_gradients(model)
    processes.sum_gradients(value_model.head if shared else value_model)

    with torch.no_grad():
        moved = (values - picked(rollout.old_values)).abs() > config.value_clip_range
        real = float(mask.sum())
        sums = processes.sum(float(policy_loss.detach()), float(value_loss.detach()), float(ptx.detach()),
                             float(stats.clip_fraction) * real,
                             float(stats.approx_kl) * real, float((moved & mask).sum()), real)
    policy_sum, value_sum, ptx_sum, clipped, approx_kl, value_clipped, tokens = sums
    return {"losses/policy": policy_sum, "losses/value": value_sum, "losses/ptx": ptx_sum,
            "policy/clip_fraction": clipped / tokens, "policy/approx_kl": approx_kl / tokens,
            "value/clip_fraction": value_clipped / tokens,
            "value/explained_variance": float(explained_variance(values.detach(), picked(rollout.returns), mask)),
            "tokens": tokens}


def _rollout_logs(scores: Tensor, rewards: Tensor, reward_logs: dict[str, float], sequence_kl: float,
                  beta: float, generated, processes) -> dict[str, float]:
    """The rollout's reward, KL and length figures, averaged over the answers of every process."""
    count = float(len(generated.completions))
    lengths = float(sum(len(completion) for completion in generated.completions))
    totals = processes.sum(float(scores.sum()), float(rewards.sum()), sequence_kl * count, lengths, count,
                           *[value * count for value in reward_logs.values()])
    score_sum, total_sum, kl_sum, length_sum, count, *function_sums = totals
    return {"rewards/score": score_sum / count, "rewards/total": total_sum / count,
            **{name: value / count for name, value in zip(reward_logs, function_sums)},
            "kl/per_answer": kl_sum / count, "kl/beta": beta, "completions/mean_length": length_sum / count}
