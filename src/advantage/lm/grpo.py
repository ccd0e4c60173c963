"""GRPO, Group Relative Policy Optimization (seed 000): PPO on the token MDP with the group mean as the baseline.

For each prompt q, sample a group of G completions o_1..o_G from pi_old, score them r_1..r_G, and give every token of
answer i the advantage of its answer within the group (seed 000):

    A_i = (r_i - mean(r)) / std(r)

No value model: the other answers to the same prompt are the baseline. The policy then maximises PPO's clipped
objective per token with a KL penalty to the frozen reference pi_ref (the starting model), estimated per token by k3:

    J(theta) = E 1/G sum_i 1/|o_i| sum_t { min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta D_KL },
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),
    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1.

The loss is `objectives.grpo.grpo_loss` (minus J), whose `aggregation` chooses between the seed's per-answer mean
("sequence"), every token of the batch alike ("token"), and a constant normaliser ("constant"); the advantage is
`objectives.grpo.group_normalized_advantages`. Counts are taken over the whole batch of every process before any
micro-batch, so splitting the batch (gradient accumulation, processes) never changes the gradient.

One optimizer step, read top to bottom in `train`:
    1. take `batch_size` prompts; 2. sample G completions of each (the prompt is run once for its G samples,
    `generation.generate`); 3. score them (`rewards.combined_rewards`, or a reward model); 4. group-normalised
    advantages; 5. log pi_old (a fresh forward pass: the ratio is exactly 1 at the first inner iteration) and
    log pi_ref; 6. `num_iterations` optimizer steps on these completions, each over every micro-batch.

KL placement (`kl_placement`): "loss_weighted" (default) puts beta k(a) in the loss multiplied by the ratio
pi / pi_old, whose gradient is the unbiased grad KL(pi || pi_ref) for k3 and k1 (docs/math.md, "KL placement");
"loss" differentiates beta k(a) as the seed writes it; "reward" subtracts beta sum_t k(a_t) (detached) from each
completion's reward before the group normalisation, as RLHF does per token. beta = 0 loads no reference model.

metrics.jsonl (`step` = optimizer steps): the names docs/metrics.md gives grpo (eval/ on rank 0).

final/ is the trained causal LM in Hugging Face format, as sft writes it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from advantage.lm.config import mixed_precision
from advantage.lm.data_order import DataOrder, fingerprint
from advantage.lm.generation import Generated, generate
from advantage.lm.loading import add_lora, end_ids, load_policy, max_length, pad_id
from advantage.lm.logprobs import SharedPromptBatch, answer_log_probs, collate_shared_prompt
from advantage.lm.models import evaluation_mode
from advantage.lm.online import OnlineConfig, Scorer, evaluate, groups_of, load_prompts, validate_online
from advantage.lm.schedule import learning_rate_at, make_optimizer
from advantage.lm.session import LMSession, StepWindow
from advantage.objectives.grpo import group_normalized_advantages, grpo_loss
from advantage.objectives.kl import KL_ESTIMATORS, kl_estimate, kl_reward_penalty
from advantage.objectives.masking import AGGREGATIONS, masked_sum
from advantage.run.config import param, require
from advantage.run.processes import Processes
from advantage.run.seeding import derive_seed
from advantage.run.session import Run


@dataclass
class GRPOConfig(OnlineConfig):
    """GRPO's hyperparameters: the online fields (batch_size = prompts per step), the group and the loss."""

    group_size: int = param(8, "G: completions sampled per prompt")
    num_iterations: int = param(1, "optimizer steps on each batch of completions (mu; the ratio is 1 at the first)")
    clip_range: float = param(0.2, "epsilon of the clipped ratio")
    clip_range_high: float = param(0.0, "upper epsilon if different (0: the same as clip_range)")
    beta: float = param(0.04, "KL coefficient; 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = param("k3", "per-token KL estimator (seed 000: k3)")
    kl_placement: Literal["loss_weighted", "loss", "reward"] = param(
        "loss_weighted", "where the KL goes: in the loss weighted by the ratio (unbiased gradient), in the loss as "
                         "the seed writes it, or subtracted from the reward")
    aggregation: Literal["sequence", "token", "constant"] = param(
        "sequence", "loss normaliser: sequence (the seed's 1/|o_i| per answer), token (every token alike), "
                    "constant (G x max_new_tokens)")
    scale_rewards: bool = param(True, "divide the group-centred rewards by the group's std (false: Dr. GRPO)")
    learning_rate: float = param(1e-5, "AdamW peak learning rate")
    batch_size: int = param(8, "prompts per optimizer step (each with group_size completions)")


CONFIG = GRPOConfig


def validate(config: GRPOConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_online(config)
    require(config.group_size >= 2, "group_size", "must be >= 2 (the group is the baseline)", config.group_size)
    require(config.num_iterations >= 1, "num_iterations", "must be >= 1", config.num_iterations)
    require(config.clip_range > 0, "clip_range", "must be > 0", config.clip_range)
    require(config.clip_range_high >= 0, "clip_range_high", "must be >= 0", config.clip_range_high)
    require(config.beta >= 0 and math.isfinite(config.beta), "beta", "must be >= 0", config.beta)
    require(config.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {KL_ESTIMATORS}",
            config.kl_estimator)
    require(config.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}", config.aggregation)


# ------------------------------------------------------------------------------------------------------ the update


@dataclass
class Rollout:
    """One micro-batch of prompts with their G completions, and what the update needs of them."""

    batch: SharedPromptBatch
    advantages: Tensor  # (b * G,)
    old_log_probs: Tensor | None  # (b * G, A); None when num_iterations = 1 (then pi_old = pi_theta, detached)
    ref_log_probs: Tensor | None  # (b * G, A); None without a reference


@torch.no_grad()
def _log_probs_without_grad(model: nn.Module, batch: SharedPromptBatch, temperature: float) -> Tensor:
    """`answer_log_probs` in eval mode, without a graph (pi_old, pi_ref)."""
    with evaluation_mode(model):
        log_probs = answer_log_probs(model, batch, temperature)
    return log_probs


def micro_batch_loss(model: nn.Module, rollout: Rollout, config: GRPOConfig, num_tokens: float,
                     num_sequences: float) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of minus J_GRPO (`objectives.grpo.grpo_loss`), normalised by whole-batch counts."""
    log_probs = answer_log_probs(model, rollout.batch, config.temperature)  # (b * G, A): log pi_theta
    old = rollout.old_log_probs if rollout.old_log_probs is not None else log_probs.detach()
    in_loss = config.beta > 0 and config.kl_placement != "reward"
    loss, stats, kl_ref = grpo_loss(
        log_probs, old, rollout.advantages, rollout.batch.answer_mask, config.clip_range,
        config.clip_range_high or None, beta=config.beta if in_loss else 0.0,
        ref_log_probs=rollout.ref_log_probs if in_loss else None, kl_estimator=config.kl_estimator,
        kl_placement="loss" if config.kl_placement == "loss" else "loss_weighted", aggregation=config.aggregation,
        constant_length=config.max_new_tokens, num_tokens=num_tokens, num_sequences=num_sequences)
    tokens = float(rollout.batch.answer_mask.sum())
    with torch.no_grad():
        mask = rollout.batch.answer_mask
        approx_kl = float(kl_estimate(old, log_probs.detach(), "k3")[mask].sum())
        if rollout.ref_log_probs is not None and not in_loss:
            kl_ref = kl_estimate(log_probs.detach(), rollout.ref_log_probs, config.kl_estimator)[mask].mean()
    # Token-weighted sums, so that micro-batches and processes combine into the batch's means.
    return loss, {"clip_tokens": float(stats.clip_fraction) * tokens, "approx_kl_sum": approx_kl,
                  "kl_ref_sum": float(kl_ref) * tokens, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------------- training


def train(config: GRPOConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Fine-tune `config.model` with GRPO on the prompts of `config.data` (or the built-in task).

    Returns:
        The Run, whose `.model` is the trained causal LM as saved in final/.
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    session = LMSession("grpo", config, run_dir, resume)
    processes = session.processes

    # The data (prompts), the policy, the reward, and the reference (a frozen copy of the start, or the base model
    # with the adapters disabled under LoRA; none with beta = 0).
    model, tokenizer = load_policy(config)
    pad, ends, length = pad_id(tokenizer), end_ids(tokenizer, model), max_length(config, model)
    train_prompts, eval_prompts = load_prompts(config, session.run_dir, tokenizer, length)
    scorer = Scorer(config, tokenizer, ends)
    reference = None
    if config.beta > 0 and not config.lora_r:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if config.lora_r:
        model = add_lora(model, config)
    model.train()
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    rounds = config.max_steps // config.num_iterations if config.max_steps else \
        max(1, math.ceil(config.epochs * len(train_prompts) / config.batch_size))
    steps = rounds * config.num_iterations
    order = DataOrder(len(train_prompts), config.batch_size, config.seed, processes.rank, processes.world_size)
    session.start(model, optimizer, steps, fingerprint([prompt.ids for prompt in train_prompts]))
    micro_batches = config.gradient_accumulation_steps
    evaluating = bool(eval_prompts) and processes.is_main
    max_norm = config.max_grad_norm or math.inf
    step = session.start_step
    last: dict = {}
    window = StepWindow()
    checkpoint_pending = False

    def reference_log_probs(batch: SharedPromptBatch) -> Tensor | None:
        if config.beta == 0:
            return None
        if reference is not None:
            return _log_probs_without_grad(reference, batch, config.temperature)
        with model.disable_adapter():
            return _log_probs_without_grad(model, batch, config.temperature)

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, eval_prompts, scorer, config, pad)

    if step == 0 and evaluating:
        last = session.metrics.log(0, session.elapsed(), held_out())
    while step < steps:
        began = time.perf_counter()
        round_index = step // config.num_iterations

        # 1-2. This process's prompts, and G completions of each, sampled from pi_old (= the current policy).
        prompts = [train_prompts[index] for index in order.batch(round_index)]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, round_index, processes.rank))
        with mixed_precision(config):
            generated = generate(model, [prompt.ids for prompt in prompts], samples_per_prompt=config.group_size,
                                 max_new_tokens=config.max_new_tokens, eos_id=ends, pad_id=pad,
                                 temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                 generator=generator, min_new_tokens=config.min_new_tokens)
        generation_s = time.perf_counter() - began

        # 3. Rewards r_i of every completion.
        rewards, reward_logs = scorer(prompts, generated)

        # 5 (before 4 when the KL is a reward term). Micro-batches of whole groups, with log pi_old and log pi_ref.
        size = len(prompts) // micro_batches
        rollouts = []
        groups = groups_of(generated.completions, config.group_size)
        with mixed_precision(config):
            for start in range(0, len(prompts), size):
                batch = collate_shared_prompt([prompt.ids for prompt in prompts[start:start + size]],
                                              groups[start:start + size], pad)
                old = _log_probs_without_grad(model, batch, config.temperature) if config.num_iterations > 1 \
                    else None
                rollouts.append(Rollout(batch, torch.empty(0), old, reference_log_probs(batch)))
        if config.kl_placement == "reward" and config.beta > 0:
            penalties = []
            for rollout in rollouts:
                current = rollout.old_log_probs if rollout.old_log_probs is not None else \
                    _log_probs_without_grad(model, rollout.batch, config.temperature)
                per_token = kl_reward_penalty(current, rollout.ref_log_probs, config.beta, config.kl_estimator)
                penalties.append(masked_sum(per_token, rollout.batch.answer_mask, dim=-1))  # -beta sum_t k(a_t)
            rewards = rewards + torch.cat(penalties)

        # 4. A_i = (r_i - mean(r)) / std(r) within each group (seed 000).
        advantages = group_normalized_advantages(rewards, config.group_size, scale_by_std=config.scale_rewards)
        for index, rollout in enumerate(rollouts):
            rows = rollout.batch.answer_ids.shape[0]
            rollout.advantages = advantages[index * size * config.group_size:][:rows]
        # Whole-batch counts (every process) for an exact aggregation over micro-batches and processes.
        num_tokens, num_sequences = processes.sum(sum(float(r.batch.answer_mask.sum()) for r in rollouts),
                                                  len(generated.completions))

        # 6. num_iterations optimizer steps on these completions.
        for _ in range(config.num_iterations):
            if step >= steps:
                break
            trained = time.perf_counter()
            learning_rate = learning_rate_at(config, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            loss_total, sums = 0.0, {"clip_tokens": 0.0, "approx_kl_sum": 0.0, "kl_ref_sum": 0.0, "tokens": 0.0}
            with mixed_precision(config):
                for rollout in rollouts:
                    loss, stats = micro_batch_loss(model, rollout, config, num_tokens, num_sequences)
                    loss.backward()  # accumulate: the shares add up to the whole batch's loss
                    loss_total += float(loss.detach())
                    for key in sums:
                        sums[key] += stats[key]
            loss_total, *summed = processes.sum(loss_total, *sums.values())
            sums = dict(zip(sums, summed))
            processes.sum_gradients(model)
            window.optimizer_step(session, optimizer, loss_total, max_norm)
            step += 1
            training_s = time.perf_counter() - trained
            window.end_step(int(sums["tokens"]), generation_s + training_s)
            logs = _step_logs(config, processes, rewards, generated, ends, reward_logs, sums)
            evaluation_due = evaluating and session.evaluation_due(step)
            if step % config.log_every == 0 or step == steps or evaluation_due:
                logged = {**window.figures("losses/grpo"), **logs,
                          "time/generation_s": generation_s, "time/training_s": training_s,
                          "charts/learning_rate": learning_rate, "charts/skipped_updates": session.skipped_updates}
                if evaluation_due:
                    logged.update(held_out())
                last = session.metrics.log(step, session.elapsed(), logged)
                session.show(step, {"reward": logged["rewards/mean"], "kl": logged["kl/per_token"]})
                window = StepWindow()
            # A checkpoint waits for the end of the batch's iterations: a resumed run starts with fresh samples.
            checkpoint_pending = checkpoint_pending or session.checkpoint_due(step)
            if checkpoint_pending and (step % config.num_iterations == 0 or step == steps):
                session.save(step, {"data_order": order.state(round_index + 1)})
                checkpoint_pending = False
            generation_s = 0.0

    model = session.finish(model, tokenizer, step)
    return Run(session.run_dir, "grpo", config, last, step, model, tokenizer)


def _step_logs(config: GRPOConfig, processes: Processes, rewards: Tensor, generated: Generated,
               ends: tuple[int, ...], reward_logs: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """The step's reward, completion and policy figures, over the whole batch of every process."""
    grouped = rewards.view(-1, config.group_size)
    lengths = torch.tensor([len(completion) for completion in generated.completions], dtype=torch.float32)
    truncated = sum(1 for completion in generated.completions if not completion or completion[-1] not in ends)
    count = float(len(generated.completions))
    totals = processes.sum(float(rewards.sum()), float(grouped.std(dim=-1, correction=0).sum()),
                           float(lengths.sum()), float(truncated), count, float(grouped.shape[0]),
                           *[value * count for value in reward_logs.values()])
    reward_sum, std_sum, length_sum, truncated_sum, count, groups, *function_sums = totals
    tokens = max(sums["tokens"], 1.0)
    return {"rewards/mean": reward_sum / count, "rewards/std_in_group": std_sum / groups,
            **{name: value / count for name, value in zip(reward_logs, function_sums)},
            "completions/mean_length": length_sum / count, "completions/truncated": truncated_sum / count,
            "policy/clip_fraction": sums["clip_tokens"] / tokens, "policy/approx_kl": sums["approx_kl_sum"] / tokens,
            "kl/per_token": sums["kl_ref_sum"] / tokens}
