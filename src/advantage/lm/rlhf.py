"""RLHF with PPO (docs/math.md §5): the policy maximises a reward model's score minus a KL to the SFT model.

The objective, for the policy pi^RL starting from the SFT model pi^SFT (the frozen reference):

    objective(phi) = E_{(x, y) ~ pi^RL}[ r_theta(x, y) - beta log(pi^RL(y|x) / pi^SFT(y|x)) ]
                     + gamma E_{x ~ D_pretrain}[ log pi^RL(x) ]                                  (PPO-ptx)

On the token MDP (state = prefix, action = next token, deterministic transition) the KL term splits over the
tokens, and the reward model scores only the finished answer, so each answer token t gets the reward

    r_t = -beta k(a_t)  (+ r_theta(x, y) at the last token),     k = log pi^RL / pi^SFT (k1) by default

(`objectives.rlhf.shaped_token_rewards`). A value model V(s_t) estimates the return from each prefix; GAE over the
answer's tokens (docs/math.md §2: A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) -
V(s_t); `objectives.rlhf.advantages_and_returns`) gives the advantages, whitened over the batch; PPO's clipped
surrogate (§3, `objectives.ppo.clipped_surrogate_loss`) updates the policy and the clipped squared error
(`objectives.policy_gradient.clipped_value_loss`) the value model, over several epochs of minibatches. The KL
coefficient is fixed, or adapted towards `target_kl` by the 1.5x rule (§3, `objectives.ppo.adaptive_kl_beta`).
With `ptx_coef` > 0 the PPO-ptx term -gamma E[log pi(x)] on `ptx_data` joins the policy's loss
(`objectives.rlhf.ptx_loss`). The KL may instead go in the loss (`kl_placement loss`,
`objectives.rlhf.kl_penalty_loss`), with k1, k2 or k3; the default (reward, k1) is the combination whose policy
gradient is unbiased (docs/math.md §4, "KL placement").

One rollout, read top to bottom in `train`: `collect` (1. sample answers; 2. score them, log pi_old, log pi_ref,
V_old; 3. per-token rewards; 4. GAE), then 5. `update_epochs` passes of `ppo_step` over minibatches of prompts, and
6. the adaptive beta for the next rollout.

The value model is separate by default (its own body, from the reward model if given, else from the policy:
InstructGPT's choice; the value loss never pulls on the policy); `value_model shared` puts a value head on the
policy's body instead. metrics.jsonl: the names docs/metrics.md gives rlhf (`step` = optimizer steps). final/ is the
trained policy in Hugging Face format; final/value_model/ the value model (ScalarHeadModel format).
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
from advantage.lm.data_order import DataOrder, fingerprint, minibatch_order
from advantage.lm.examples import TokenBatch, cycled_batch, tokenize_pairs
from advantage.lm.generation import Generated
from advantage.lm.loading import add_lora, load_policy
from advantage.lm.logprobs import answer_log_probs, collate_shared_prompt, masked_log_probs
from advantage.lm.models import ScalarHeadModel, evaluation_mode
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
from advantage.lm.sharding import (
    checkpoint_state,
    gathered_full_state,
    is_sharded,
    memory_figures,
    restore_checkpoint_state,
    shard,
)
from advantage.objectives.kl import KL_ESTIMATORS, kl_estimate
from advantage.objectives.masking import fill_padding
from advantage.objectives.policy_gradient import clipped_value_loss, explained_variance
from advantage.objectives.ppo import adaptive_kl_beta, clipped_surrogate_loss
from advantage.objectives.rlhf import advantages_and_returns, kl_penalty_loss, ptx_loss, shaped_token_rewards
from advantage.run.config import param, require
from advantage.run.processes import Processes
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
    kl_estimator: Literal["k1", "k2", "k3"] = param("k1", "per-token KL estimator (k1 = log pi / pi_ref)")
    kl_placement: Literal["reward", "loss"] = param("reward", "KL folded into the token rewards (RLHF's), or a "
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
    require(config.sharding == "none" or config.value_model == "separate", "value_model",
            "must be separate with --sharding fsdp (a shared value head reads the policy's sharded body outside the "
            "policy's forward)", config.value_model)
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


# --------------------------------------------------------------------------------------------- collect and score


@dataclass
class Rollout:
    """One batch of sampled answers and everything PPO needs of it, per answer token (B * K rows, A columns)."""

    prompt_ids: list[list[int]]
    groups: list[list[list[int]]]  # the K answers of each prompt
    old_log_probs: Tensor  # log pi_old(a_t | s_t)
    ref_log_probs: Tensor  # log pi_ref(a_t | s_t)
    old_values: Tensor  # V_old(s_t)
    advantages: Tensor
    returns: Tensor  # the value model's targets
    mask: Tensor
    logs: dict[str, float]  # the rollout's reward, KL and length figures, over every process
    sequence_kl: float  # this process's mean KL per answer, sum_t k(a_t)
    generation_s: float
    scoring_s: float



def collect(models: OnlineModels, prompts: list[PromptExample], config: RLHFConfig, generator: torch.Generator,
            beta: float, processes: Processes) -> Rollout:
    """Steps 1-4: answers sampled from the current policy, scored, shaped into per-token rewards, and GAE."""
    began = time.perf_counter()
    # 1. Sample answers to this process's prompts from the current policy.
    with mixed_precision(config):
        generated = models.sample(prompts, config.samples_per_prompt, config, generator)
    generation_s = time.perf_counter() - began
    began = time.perf_counter()

    # 2. Score them; log pi_old, log pi_ref and V_old per answer token.
    scores, reward_logs = models.scorer(prompts, generated)
    groups = groups_of(generated.completions, config.samples_per_prompt)
    prompt_ids = [prompt.ids for prompt in prompts]
    batch = processes.put(collate_shared_prompt(prompt_ids, groups, models.pad))
    mask = batch.answer_mask
    with mixed_precision(config):
        old_log_probs = models.policy_log_probs(batch, config.temperature)
        ref_log_probs = models.reference_log_probs(batch, config.temperature)
        with torch.no_grad(), evaluation_mode(models.value_model):
            old_values = models.value_model.answer_values(batch).float()

    # 3. Per-token rewards: -beta k(a_t) on every token (in the reward placement), the score at the last one.
    rewards, kl = shaped_token_rewards(scores, old_log_probs, ref_log_probs, mask,
                                       beta if config.kl_placement == "reward" else 0.0, config.kl_estimator)
    if config.kl_placement != "reward" or beta == 0:
        kl = fill_padding(kl_estimate(old_log_probs, ref_log_probs, config.kl_estimator), mask)
    sequence_kl = float(kl.sum(dim=1).mean())

    # 4. GAE over tokens; the returns are the value model's targets.
    advantages, returns = advantages_and_returns(rewards, old_values, mask, config.gamma, config.gae_lambda,
                                                 config.normalize_advantage)
    logs = _rollout_logs(scores, rewards, reward_logs, sequence_kl, beta, generated, processes)
    return Rollout(prompt_ids, groups, old_log_probs, ref_log_probs, old_values, advantages, returns, mask, logs,
                   sequence_kl, generation_s, time.perf_counter() - began)


def _rollout_logs(scores: Tensor, rewards: Tensor, reward_logs: dict[str, float], sequence_kl: float,
                  beta: float, generated: Generated, processes: Processes) -> dict[str, float]:
    """The rollout's reward, KL and length figures, averaged over the answers of every process."""
    count = float(len(generated.completions))
    lengths = float(sum(len(completion) for completion in generated.completions))
    totals = processes.sum(float(scores.sum()), float(rewards.sum()), sequence_kl * count, lengths, count,
                           *[value * count for value in reward_logs.values()])
    score_sum, total_sum, kl_sum, length_sum, count, *function_sums = totals
    return {"rewards/score": score_sum / count, "rewards/total": total_sum / count,
            **{name: value / count for name, value in zip(reward_logs, function_sums)},
            "kl/per_answer": kl_sum / count, "kl/beta": beta, "completions/mean_length": length_sum / count}


# ------------------------------------------------------------------------------------------------------ the update


def ppo_step(models: OnlineModels, rollout: Rollout, prompts: list[int], pretraining: TokenBatch | None,
             config: RLHFConfig, processes: Processes) -> dict[str, float]:
    """Accumulate the gradients of one minibatch (the rollout's `prompts`) in the policy and the value model.

    Losses are token means over the minibatch of every process (its real tokens counted first), so that the
    gradients summed over processes are those of one process with the whole minibatch.
    """
    model, value_model = models.policy, models.value_model
    per_prompt = config.samples_per_prompt  # answer row b * K + k is answer k of prompt b
    rows = torch.tensor([b * per_prompt + k for b in prompts for k in range(per_prompt)], device=rollout.mask.device)
    batch = processes.put(collate_shared_prompt([rollout.prompt_ids[b] for b in prompts],
                                                [rollout.groups[b] for b in prompts], models.pad))
    mask = batch.answer_mask
    width = mask.shape[1]

    def picked(tensor: Tensor) -> Tensor:  # the minibatch's rows, cut to its own answer width
        return tensor[rows][:, :width]

    num_tokens = processes.sum(float(mask.sum()))[0]
    # The policy: PPO's clipped surrogate (docs/math.md §3), the KL as a loss term when placed there (§4), PPO-ptx
    # (§5), + gamma E_{x ~ D_pretrain}[log pi(x)] as a loss.
    log_probs = answer_log_probs(model, batch, config.temperature)
    policy_loss, stats = clipped_surrogate_loss(log_probs, picked(rollout.old_log_probs), picked(rollout.advantages),
                                                config.clip_range, mask, num_tokens=num_tokens)
    beta = rollout.logs["kl/beta"]
    if config.kl_placement == "loss" and beta > 0:
        policy_loss = policy_loss + kl_penalty_loss(log_probs, picked(rollout.ref_log_probs), mask, beta,
                                                    config.kl_estimator, num_tokens=num_tokens)
    ptx = torch.zeros(())
    if pretraining is not None:
        pretrain_log_probs = masked_log_probs(model, pretraining.input_ids, pretraining.attention_mask,
                                              pretraining.position_ids, pretraining.loss_mask)
        ptx = ptx_loss(pretrain_log_probs, pretraining.loss_mask, config.ptx_coef) / processes.world_size
    (policy_loss + ptx).backward()

    # The value model: the clipped squared error to the returns.
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
    models, tokenizer, ptx_examples, train_prompts, eval_prompts = _load(config, session.run_dir, processes.device)
    if config.sharding == "fsdp":  # the policy, its frozen reference and the value model (lm/sharding.py)
        models.policy = shard(models.policy, processes.world_size)
        if models.reference is not None:
            models.reference = shard(models.reference, processes.world_size)
        models.value_model = shard(models.value_model, processes.world_size, forward_methods=("answer_values",))
    model, value_model = models.policy, models.value_model
    # The value optimizer steps a separate model whole, a shared body's head only (the policy's optimizer the rest).
    value_parameters = list(value_model.head.parameters() if config.value_model == "shared" else
                            value_model.parameters())
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
        restore_checkpoint_state(value_model, value_optimizer, state["value_model"], state["value_optimizer"],
                                 state.get("value_optimizer_keys") == "names")
        beta = float(state["kl_coef"])
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
        round_index = step // per_rollout

        # 1-4. This process's prompts, sampled, scored, and their advantages (`collect`).
        prompts = [train_prompts[index] for index in order.batch(round_index)]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, round_index, processes.rank))
        rollout = collect(models, prompts, config, generator, beta, processes)
        generation_s, training_s = rollout.generation_s, rollout.scoring_s
        # 6 (decided now, applied to the next rollout). The adaptive KL coefficient: the 1.5x rule (docs/math.md §3).
        next_beta = adaptive_kl_beta(beta, processes.sum(rollout.sequence_kl)[0] / processes.world_size,
                                     config.target_kl) if config.target_kl > 0 else beta

        # 5. PPO: update_epochs passes, each over num_minibatches minibatches of prompts, one optimizer step each.
        shuffle = torch.Generator().manual_seed(config.seed * INDEX_STRIDE + round_index)  # its own stream
        for minibatch in minibatch_order(len(prompts), config.update_epochs, config.num_minibatches, shuffle):
            if step >= steps:
                break
            trained = time.perf_counter()
            learning_rate = set_learning_rate(optimizer, config, step, steps)
            with mixed_precision(config):
                pretraining = processes.put(cycled_batch(ptx_examples, step, config.ptx_batch_size, models.pad)) \
                    if ptx_examples else None
                figures = ppo_step(models, rollout, minibatch, pretraining, config, processes)
            loss = figures["losses/policy"] + figures["losses/ptx"]
            if window.optimizer_step(session, optimizer, loss, max_norm):  # both skip a non-finite step
                nn.utils.clip_grad_norm_(value_parameters, max_norm)
                value_optimizer.step()
            value_optimizer.zero_grad(set_to_none=True)
            step += 1
            training_s += time.perf_counter() - trained
            window.end_step(int(figures.pop("tokens")), generation_s + training_s)
            evaluation_due = evaluating and session.evaluation_due(step)
            if step % config.log_every == 0 or step == steps or evaluation_due:
                logged = {**window.figures("losses/total"), **figures, **rollout.logs,
                          "time/generation_s": generation_s, "time/training_s": training_s,
                          "charts/learning_rate": learning_rate, "charts/skipped_updates": session.skipped_updates,
                          **memory_figures(model, optimizer, processes.device),
                          **(held_out() if evaluation_due else {})}
                last = session.metrics.log(step, session.elapsed(), logged)
                session.show(step, {"score": logged["rewards/score"], "kl": rollout.sequence_kl})
                window = StepWindow()
            # A checkpoint waits for the end of the rollout: a resumed run starts with a fresh rollout.
            checkpoint_pending = checkpoint_pending or session.checkpoint_due(step)
            if checkpoint_pending and (step % per_rollout == 0 or step == steps):
                values, value_state, by_name = checkpoint_state(value_model, value_optimizer)  # sharded: collective
                session.save(step, {"data_order": order.state(round_index + 1), "value_model": values,
                                    "value_optimizer": value_state, "kl_coef": next_beta,
                                    **({"value_optimizer_keys": "names"} if by_name else {})})
                checkpoint_pending = False
            generation_s, training_s = 0.0, 0.0
        beta = next_beta

    if is_sharded(value_model):  # rank 0 writes the gathered weights from an unsharded copy
        full = gathered_full_state(value_model)
        value_model = _unsharded_value_model(models, config, full) if processes.is_main else value_model
    model = session.finish(model, tokenizer, step)
    if processes.is_main:
        value_model.save_pretrained(session.run_dir / "final" / "value_model")
    return Run(session.run_dir, "rlhf", config, last, step, model, tokenizer)


def _unsharded_value_model(models: OnlineModels, config: RLHFConfig, full: dict[str, Tensor]) -> ScalarHeadModel:
    """A plain value model on the CPU holding the `full` weights of a sharded one, built as `_load` built it (from the
    reward model, else from the starting policy)."""
    if models.scorer.model is not None:
        value_model = copy.deepcopy(models.scorer.model).to("cpu")
    else:
        value_model = ScalarHeadModel.from_causal_lm(load_policy(config, torch.device("cpu"))[0], seed=config.seed,
                                                     share_body=True)
    value_model.load_state_dict(full)
    return value_model


def _load(config: RLHFConfig, run_dir: Path, device: torch.device) -> tuple[OnlineModels, object, list, list, list]:
    """The models (the policy in training mode, with its adapters under LoRA), the tokenizer, the pretraining
    examples of PPO-ptx, and the training and held-out prompts."""
    loaded, tokenizer, length, train_prompts, eval_prompts = load_online(config, run_dir, True, device)
    model, scorer = loaded.policy, loaded.scorer
    ptx_examples = []
    if config.ptx_coef > 0:
        ptx_examples, _ = tokenize_pairs(sft_pairs(load_rows(config.ptx_data, "sft"), tokenizer), tokenizer, length,
                                         loaded.ends)
    if config.value_model == "separate":  # its own body, copied before any adapter
        value_model = copy.deepcopy(scorer.model) if scorer.model is not None else \
            ScalarHeadModel.from_causal_lm(model, seed=config.seed)
        value_model.requires_grad_(True)
    if config.lora_r:
        model = add_lora(model, config)
    if config.value_model == "shared":  # a head on the policy's own body (its adapters, with LoRA)
        body = (model.get_base_model() if config.lora_r else model).base_model
        value_model = ScalarHeadModel(body, seed=config.seed)
    models = OnlineModels(model.train(), loaded.reference, scorer, loaded.pad, loaded.ends, value_model.train())
    return models, tokenizer, ptx_examples, train_prompts, eval_prompts
