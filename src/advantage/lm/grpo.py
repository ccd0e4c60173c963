"""GRPO, Group Relative Policy Optimization (docs/math.md §6): PPO on the token MDP, the group mean as baseline.

For each prompt q, sample a group of G completions o_1..o_G from pi_old, score them r_1..r_G, and give every token of
answer i the advantage of its answer within the group:

    A_i = (r_i - mean(r)) / std(r)

No value model: the other answers to the same prompt are the baseline (`baseline="leave_one_out"` leaves r_i out
of its own: RLOO, docs/math.md §6b). The policy then maximises PPO's clipped
objective per token with a KL penalty to the frozen reference pi_ref (the starting model), estimated per token by k3:

    J(theta) = E 1/G sum_i 1/|o_i| sum_t { min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta D_KL },
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),
    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1.

The loss is `objectives.grpo.grpo_loss` (minus J), whose `aggregation` chooses between the notes' per-answer mean
("sequence"), every token of the batch alike ("token"), and a constant normaliser ("constant"); the advantage is
`objectives.grpo.group_normalized_advantages`. Counts are taken over the whole batch of every process before any
micro-batch, so splitting the batch (gradient accumulation, processes) never changes the gradient.

One batch, read top to bottom in `train`: 1. take `batch_size` prompts; then `collect`: 2. sample G completions of
each (the prompt is run once for its G samples, `generation.generate`); 3. score them (`rewards.combined_rewards`,
or a reward model); 4. log pi_old (a fresh forward pass: the ratio is exactly 1 at the first inner iteration) and
log pi_ref; 5. group-normalised advantages; then 6. `num_iterations` optimizer steps on these completions
(`accumulate_gradients`, each over every micro-batch).

KL placement (`kl_placement`): "loss_weighted" (default) puts beta k(a) in the loss multiplied by the ratio
pi / pi_old, whose gradient is the unbiased grad KL(pi || pi_ref) for k3 and k1 (docs/math.md, "KL placement");
"loss" differentiates beta k(a) as the notes write it; "reward" subtracts beta sum_t k(a_t) (detached) from each
completion's reward before the group normalisation (`objectives.grpo.answer_kl_penalty`), as RLHF does per token.
beta = 0 loads no reference model.

GSPO (`importance_ratio_level` "sequence", docs/math.md §6b): the clipped ratio is each answer's geometric mean of
its tokens' ratios, s_i = (pi_theta(o_i|q) / pi_old(o_i|q))^(1/|o_i|), instead of each token's.

Answers cut at max_new_tokens. With `mask_truncated_completions` an answer that reached max_new_tokens without an end
token is left out of the loss: its reward is not the reward of a finished answer. Its tokens leave the loss and the
token count; it stays in the answer count, adding 0 to the per-answer mean ("constant" keeps its fixed normaliser),
as TRL counts it. Its reward still enters its group's mean and std, so the others' advantages do not change (DAPO's
overlong filtering; TRL's option of the same name). The policy figures (clip fraction, approx KL, kl/per_token) are
then means over the tokens the loss counts.

metrics.jsonl (`step` = optimizer steps): the names docs/metrics.md gives grpo (eval/ on rank 0).

final/ is the trained causal LM in Hugging Face format, as sft writes it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from advantage.lm.config import mixed_precision
from advantage.lm.cuda_graphs import GraphedPasses, padding_multiples, training_graphs
from advantage.lm.data_order import DataOrder, fingerprint
from advantage.lm.generation import Generated
from advantage.lm.loading import add_lora
from advantage.lm.logprobs import SharedPromptBatch, answer_log_probs, collate_shared_prompt
from advantage.lm.online import (
    OnlineConfig,
    OnlineModels,
    PromptExample,
    evaluate,
    groups_of,
    load_online,
    validate_online,
)
from advantage.lm.schedule import make_optimizer, set_learning_rate
from advantage.lm.session import LMSession, StepWindow
from advantage.lm.sharding import is_sharded, memory_figures, shard
from advantage.objectives.grpo import (
    BASELINES,
    RATIO_LEVELS,
    answer_kl_penalty,
    group_normalized_advantages,
    grpo_loss,
)
from advantage.objectives.kl import KL_ESTIMATORS, kl_estimate
from advantage.objectives.masking import AGGREGATIONS, masked_mean, masked_sum
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
    kl_estimator: Literal["k1", "k2", "k3"] = param("k3", "per-token KL estimator (GRPO's: k3)")
    kl_placement: Literal["loss_weighted", "loss", "reward"] = param(
        "loss_weighted", "where the KL goes: in the loss weighted by the ratio (unbiased gradient), in the loss as "
                         "the seed writes it, or subtracted from the reward")
    aggregation: Literal["sequence", "token", "constant"] = param(
        "sequence", "loss normaliser: sequence (the seed's 1/|o_i| per answer), token (every token alike), "
                    "constant (G x max_new_tokens)")
    scale_rewards: bool = param(True, "divide the group-centred rewards by the group's std (false: Dr. GRPO)")
    baseline: Literal["group_mean", "leave_one_out"] = param(
        "group_mean", "what each reward is centred on: its group's mean (the seed's), or the mean of the other "
                      "G - 1 answers (RLOO, docs/math.md §6b): G/(G-1) times the advantages, an unbiased policy "
                      "gradient with scale_rewards false and aggregation constant")
    importance_ratio_level: Literal["token", "sequence"] = param(
        "token", "whose ratio is clipped: each token's (the seed's) or each answer's geometric mean (GSPO, "
                 "docs/math.md §6b; its ratios stay near 1, so GSPO's authors clip at about 3e-4 and 4e-4)")
    mask_truncated_completions: bool = param(
        False, "leave answers cut at max_new_tokens (no end token) out of the loss; their rewards still count in "
               "their group's mean and std (DAPO's overlong filtering)")
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
    require(config.baseline in BASELINES, "baseline", f"must be one of {BASELINES}", config.baseline)
    require(config.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}", config.aggregation)
    require(config.importance_ratio_level in RATIO_LEVELS, "importance_ratio_level", f"must be one of {RATIO_LEVELS}",
            config.importance_ratio_level)


# ------------------------------------------------------------------------------------------- collect and score


@dataclass
class MicroBatch:
    """Whole groups of one micro-batch: the prompts with their G completions, and what the update needs of them."""

    batch: SharedPromptBatch
    advantages: Tensor  # (b * G,)
    old_log_probs: Tensor | None  # (b * G, A); None when num_iterations = 1 (then pi_old = pi_theta, detached)
    ref_log_probs: Tensor | None  # (b * G, A); None with beta = 0
    # (b * G,) 1 for an answer the loss learns from, 0 for one cut at max_new_tokens; None: every answer
    # (mask_truncated_completions false)
    in_loss: Tensor | None = None

    def loss_mask(self) -> Tensor:
        """(b * G, A): the answer tokens the loss counts."""
        mask = self.batch.answer_mask
        return mask if self.in_loss is None else mask * self.in_loss.unsqueeze(-1).to(mask.dtype)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the micro-batch by name (the inputs of a graphed pass, `cuda_graphs.GraphedPasses`)."""
        optional = {"old_log_probs": self.old_log_probs, "ref_log_probs": self.ref_log_probs,
                    "in_loss": self.in_loss}
        return {**self.batch.tensors(), "advantages": self.advantages,
                **{name: value for name, value in optional.items() if value is not None}}

    def with_tensors(self, tensors: dict[str, Tensor]) -> MicroBatch:
        """This micro-batch with the tensors of `tensors()`'s names replaced by those given."""
        return MicroBatch(self.batch.with_tensors(tensors), tensors["advantages"], tensors.get("old_log_probs"),
                          tensors.get("ref_log_probs"), tensors.get("in_loss"))


@dataclass
class Collected:
    """One batch of prompts, sampled and scored: the update phase's input and the step's figures."""

    generated: Generated
    rewards: Tensor  # (B * G,) r_i, the KL penalty included when it is a reward term
    reward_logs: dict[str, float]
    micro_batches: list[MicroBatch]
    num_tokens: float  # answer tokens of the whole batch that the loss counts, every process
    num_sequences: float  # answers of the whole batch, every process (cut ones too: they add 0 to the loss)
    generation_s: float


def collect(models: OnlineModels, prompts: list[PromptExample], config: GRPOConfig, generator: torch.Generator,
            processes: Processes, graphs: dict[str, GraphedPasses] | None = None) -> Collected:
    """Steps 2-5: G completions of each prompt from pi_old, their rewards, log pi_old and log pi_ref, and the
    group-normalised advantages, in micro-batches of whole groups (the unit of gradient accumulation).

    `graphs`: the passes are replayed as CUDA graphs (the training passes later): the micro-batches are padded to
    recurring widths, and log pi_old and log pi_ref replay the graphs of "old" and "reference" (without gradients)."""
    began = time.perf_counter()
    # 2. G completions of each prompt, sampled from pi_old (= the current policy).
    with mixed_precision(config):
        generated = models.sample(prompts, config.group_size, config, generator)
    generation_s = time.perf_counter() - began

    # 3. The reward r_i of every completion.
    rewards, reward_logs = models.scorer(prompts, generated)

    # 4. log pi_old and log pi_ref, micro-batch by micro-batch (a KL placed in the reward changes the rewards).
    size = len(prompts) // config.gradient_accumulation_steps
    groups = groups_of(generated.completions, config.group_size)
    batches, olds, references = [], [], []
    with mixed_precision(config):
        for start in range(0, len(prompts), size):
            batch = processes.put(collate_shared_prompt([prompt.ids for prompt in prompts[start:start + size]],
                                                        groups[start:start + size], models.pad,
                                                        *padding_multiples(graphs is not None)))
            batches.append(batch)
            olds.append(models.policy_log_probs(batch, config.temperature, graphs and graphs["old"])
                        if config.num_iterations > 1 else None)
            references.append(models.reference_log_probs(batch, config.temperature, graphs and graphs["reference"])
                              if config.beta > 0 else None)
    if config.kl_placement == "reward" and config.beta > 0:
        rewards = rewards + _kl_reward_terms(models, batches, olds, references, config, graphs and graphs["old"])

    # 5. A_i = (r_i - mean(r)) / std(r) within each group (docs/math.md §6); RLOO's b_i in place of mean(r) (§6b).
    advantages = group_normalized_advantages(rewards, config.group_size, scale_by_std=config.scale_rewards,
                                             baseline=config.baseline)
    # Answers cut at max_new_tokens may be left out of the loss: the group's baseline above still counts them.
    in_loss = processes.put(torch.tensor([float(bool(answer) and answer[-1] in models.ends)
                                          for answer in generated.completions])) \
        if config.mask_truncated_completions else None
    micro_batches, first = [], 0
    for batch, old, reference in zip(batches, olds, references):
        rows = batch.answer_ids.shape[0]
        micro_batches.append(MicroBatch(batch, advantages[first:first + rows], old, reference,
                                        in_loss[first:first + rows] if in_loss is not None else None))
        first += rows
    # Whole-batch counts (every process) for an exact aggregation over micro-batches and processes. A cut answer's
    # tokens leave the token count but the answer stays in the answer count, as TRL counts it: it adds 0 to the
    # per-answer mean, and "constant" keeps its fixed normaliser G x max_new_tokens. At least 1 token, so that a
    # batch whose every answer is cut has a loss of 0.
    num_tokens, num_sequences = processes.sum(sum(float(micro.loss_mask().sum()) for micro in micro_batches),
                                              len(generated.completions))
    num_tokens = max(num_tokens, 1.0)
    return Collected(generated, rewards, reward_logs, micro_batches, num_tokens, num_sequences, generation_s)


def _kl_reward_terms(models: OnlineModels, batches: list[SharedPromptBatch], olds: list[Tensor | None],
                     references: list[Tensor], config: GRPOConfig, graphs: GraphedPasses | None) -> Tensor:
    """-beta sum_t k(a_t) of each completion (`objectives.grpo.answer_kl_penalty`), under pi_old."""
    penalties = []
    for batch, old, reference in zip(batches, olds, references):
        current = old if old is not None else models.policy_log_probs(batch, config.temperature, graphs)
        penalties.append(answer_kl_penalty(current, reference, batch.answer_mask, config.beta, config.kl_estimator))
    return torch.cat(penalties)


# ------------------------------------------------------------------------------------------------------ the update


def micro_batch_loss(model: nn.Module, micro_batch: MicroBatch, config: GRPOConfig, num_tokens: float | Tensor,
                     num_sequences: float | Tensor, fixed_shape: bool = False) -> tuple[Tensor, Tensor]:
    """This micro-batch's share of minus J_GRPO (`objectives.grpo.grpo_loss`), normalised by whole-batch counts.

    Reads no value back to the host (what a CUDA graph replays, `cuda_graphs.GraphedPasses`).

    Args:
        num_tokens, num_sequences: the answer tokens the loss counts and the answers of the whole batch (every
            process); 0-d tensors in a graphed pass, whose inputs change from batch to batch.
        fixed_shape: score every answer slot and mask afterwards (`logprobs.answer_log_probs`).
    Returns:
        (loss, its figures as token-weighted sums: a (5,) tensor in the order of `SUMS`), so that micro-batches and
        processes combine into the batch's means.
    """
    log_probs = answer_log_probs(model, micro_batch.batch, config.temperature, fixed_shape)  # (b * G, A)
    old = micro_batch.old_log_probs if micro_batch.old_log_probs is not None else log_probs.detach()
    reference, mask = micro_batch.ref_log_probs, micro_batch.loss_mask()
    in_loss = reference is not None and config.kl_placement != "reward"
    loss, stats, kl_ref = grpo_loss(
        log_probs, old, micro_batch.advantages, mask, config.clip_range, config.clip_range_high or None,
        beta=config.beta if in_loss else 0.0, ref_log_probs=reference if in_loss else None,
        kl_estimator=config.kl_estimator, kl_placement="loss" if config.kl_placement == "loss" else "loss_weighted",
        aggregation=config.aggregation, constant_length=config.max_new_tokens, num_tokens=num_tokens,
        num_sequences=num_sequences, importance_ratio_level=config.importance_ratio_level)
    with torch.no_grad():
        tokens = mask.sum().to(log_probs.dtype)
        approx_kl = masked_sum(kl_estimate(old, log_probs.detach(), "k3"), mask)
        if reference is not None and not in_loss:  # the KL went into the rewards: its size under pi_theta, for logs
            kl_ref = masked_mean(kl_estimate(log_probs.detach(), reference, config.kl_estimator), mask)
        answer_tokens = micro_batch.batch.answer_mask.sum().to(log_probs.dtype)
        sums = torch.stack([stats.clip_fraction * tokens, approx_kl, kl_ref * tokens, tokens, answer_tokens])
    return loss, sums


# The figures `micro_batch_loss` sums over the batch, in its order.
# "tokens": the answer tokens the loss counts (what the figures are averaged over); "answer_tokens": every answer
# token the pass went through (the throughput).
SUMS = ("clip_tokens", "approx_kl_sum", "kl_ref_sum", "tokens", "answer_tokens")


def accumulate_gradients(model: nn.Module, collected: Collected, config: GRPOConfig, processes: Processes,
                         graphs: GraphedPasses | None = None) -> tuple[float, dict[str, float]]:
    """Step 6's gradient: every micro-batch's share of the loss, backpropagated and added up in .grad, then summed
    over the processes. Returns the batch's loss and its token-weighted sums.

    `graphs`: run each micro-batch's pass as a replayed CUDA graph (`cuda_graphs.training_graphs`; `collect` then
    padded the batches to recurring widths), with the same result."""
    device = collected.micro_batches[0].advantages.device
    counts = torch.tensor([collected.num_tokens, collected.num_sequences], device=device)  # one copy to the device
    counts = {"num_tokens": counts[0], "num_sequences": counts[1]}
    # The loss, then SUMS, added up on the device and read back once, after every pass.
    totals = torch.zeros(1 + len(SUMS), dtype=torch.float64, device=device)
    with mixed_precision(config):
        for micro_batch in collected.micro_batches:
            inputs = {**micro_batch.tensors(), **counts}

            def backward_pass(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
                loss, sums = micro_batch_loss(model, micro_batch.with_tensors(tensors), config,
                                              tensors["num_tokens"], tensors["num_sequences"], graphs is not None)
                loss.backward()  # the shares add up to the whole batch's loss
                return loss, sums

            loss, sums = graphs(inputs, backward_pass) if graphs is not None else backward_pass(inputs)
            totals += torch.cat([loss.detach().reshape(1).to(totals.dtype), sums.to(totals.dtype)])
    loss_total, *summed = processes.sum(*totals.tolist())
    processes.sum_gradients(model)
    return loss_total, dict(zip(SUMS, summed))


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
    models, tokenizer, _, train_prompts, eval_prompts = load_online(config, session.run_dir, config.beta > 0,
                                                                    processes.device)
    if config.lora_r:
        models.policy = add_lora(models.policy, config)
    if config.sharding == "fsdp":  # the policy and the frozen reference, each over the processes (lm/sharding.py)
        models.policy = shard(models.policy, processes.world_size)
        if models.reference is not None:
            models.reference = shard(models.reference, processes.world_size)
    model = models.policy.train()
    # On a GPU each micro-batch's forward and backward pass replays as one CUDA graph (None: ordinary passes), and
    # so do the passes of log pi_old and log pi_ref, each with graphs of its own (a graph serves one model in one mode).
    graphs = training_graphs(model, processes.device, config.cuda_graphs, sharded=is_sharded(model),
                             world_size=processes.world_size, micro_batches=config.gradient_accumulation_steps,
                             checkpointing=config.gradient_checkpointing, autocast=config.mixed_precision != "no")
    scoring_graphs = {name: GraphedPasses((), capture=graphs.capture) for name in ("old", "reference")} \
        if graphs is not None else None
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    rounds = config.max_steps // config.num_iterations if config.max_steps else \
        max(1, math.ceil(config.epochs * len(train_prompts) / config.batch_size))
    steps = rounds * config.num_iterations
    order = DataOrder(len(train_prompts), config.batch_size, config.seed, processes.rank, processes.world_size)
    session.start(model, optimizer, steps, fingerprint([prompt.ids for prompt in train_prompts]))
    # Rank 0 alone evaluates, unless the model is sharded: then every process takes part in each forward pass.
    evaluating = bool(eval_prompts) and (processes.is_main or is_sharded(model))
    max_norm = config.max_grad_norm or math.inf
    step = session.start_step
    last: dict = {}
    window = StepWindow()
    checkpoint_pending = False

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, eval_prompts, models.scorer, config, models.pad)

    if step == 0 and evaluating:
        last = session.metrics.log(0, session.elapsed(), held_out())
    while step < steps:
        round_index = step // config.num_iterations

        # 1-5. This process's prompts, sampled and scored (`collect`).
        prompts = [train_prompts[index] for index in order.batch(round_index)]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, round_index, processes.rank))
        collected = collect(models, prompts, config, generator, processes, scoring_graphs)
        generation_s = collected.generation_s

        # 6. num_iterations optimizer steps on these completions.
        for _ in range(min(config.num_iterations, steps - step)):
            trained = time.perf_counter()
            learning_rate = set_learning_rate(optimizer, config, step, steps)
            loss, sums = accumulate_gradients(model, collected, config, processes, graphs)
            window.optimizer_step(session, optimizer, loss, max_norm)
            step += 1
            training_s = time.perf_counter() - trained
            window.end_step(int(sums["answer_tokens"]), generation_s + training_s)
            logs = _step_logs(config, processes, collected, models.ends, sums)  # every process, every step
            evaluation_due = evaluating and session.evaluation_due(step)
            if step % config.log_every == 0 or step == steps or evaluation_due:
                logged = {**window.figures("losses/grpo"), **logs,
                          "time/generation_s": generation_s, "time/training_s": training_s,
                          "charts/learning_rate": learning_rate, "charts/skipped_updates": session.skipped_updates,
                          **memory_figures(model, optimizer, processes.device),
                          **(held_out() if evaluation_due else {})}
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


def _step_logs(config: GRPOConfig, processes: Processes, collected: Collected, ends: tuple[int, ...],
               sums: dict[str, float]) -> dict[str, float]:
    """The step's reward, completion and policy figures, over the whole batch of every process."""
    rewards, completions = collected.rewards, collected.generated.completions
    grouped = rewards.view(-1, config.group_size)
    lengths = torch.tensor([len(completion) for completion in completions], dtype=torch.float32)
    truncated = sum(1 for completion in completions if not completion or completion[-1] not in ends)
    count = float(len(completions))
    totals = processes.sum(float(rewards.sum()), float(grouped.std(dim=-1, correction=0).sum()),
                           float(lengths.sum()), float(truncated), count, float(grouped.shape[0]),
                           *[value * count for value in collected.reward_logs.values()])
    reward_sum, std_sum, length_sum, truncated_sum, count, groups, *function_sums = totals
    tokens = max(sums["tokens"], 1.0)
    return {"rewards/mean": reward_sum / count, "rewards/std_in_group": std_sum / groups,
            **{name: value / count for name, value in zip(collected.reward_logs, function_sums)},
            "completions/mean_length": length_sum / count, "completions/truncated": truncated_sum / count,
            "policy/clip_fraction": sums["clip_tokens"] / tokens, "policy/approx_kl": sums["approx_kl_sum"] / tokens,
            "kl/per_token": sums["kl_ref_sum"] / tokens}
