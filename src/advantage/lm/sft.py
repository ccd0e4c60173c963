"""Supervised fine-tuning (SFT): maximum likelihood on the completion tokens (docs/math.md §7b).

The language model as an MDP (docs/math.md §5): the state is the token prefix, the action the next token, the
transition deterministic and the prompt the fixed initial state, so the probability of a trajectory is the
product of the policy's token probabilities, log P_theta(tau) = sum_t log pi_theta(a_t | s_t). SFT maximises
this log-likelihood of demonstration completions given their prompts: the notes' objective (docs/math.md §1)
with the trajectories taken from the data instead of sampled, and R(tau) = 1 for every one of them. The loss of
one optimizer step is the token-level mean

    L(theta) = - (1 / N_tokens) sum_{examples n} sum_{completion tokens t} log pi_theta(a_t^n | s_t^n),

where N_tokens counts the completion tokens of the whole batch. Prompt tokens are states, never actions: they are
masked out. Every completion ends with exactly one end token, so the model learns to stop where sampling stops: a
chat template's end of turn (without the newline ChatML writes after it), or the EOS appended to plain text
(`tokenizer.end_completion`).

Normalisation. N_tokens is counted over the whole batch before any forward pass, and every micro-batch's loss is
its sum divided by that same N_tokens; the micro-batches' gradients add up in `.grad` to exactly the gradient of
L. So batch 8 x 1 micro-batch, 4 micro-batches of 2 and 8 of 1 give the same gradient (up to float rounding), and
padding never matters (padded positions are masked and excluded from N_tokens). A per-micro-batch mean would weight
tokens of short micro-batches more. Under torchrun, N_tokens is the count summed over the processes' shares of the
batch, and their gradients are summed (`run.processes.Processes`), so N processes compute the gradient of one.

Packing (`packing`, off by default): the examples of each micro-batch are concatenated into as few rows of at most
max_length tokens as fit, with attention isolated: a block-diagonal causal mask (each example attends only to its
own earlier tokens) and positions restarting at 0 for every example. The loss is then the same as without packing;
only padding, hence compute, shrinks. It needs an attention implementation that accepts a 4-D mask (eager, sdpa).

metrics.jsonl: one line per logged step (`step` counts optimizer steps, not examples or tokens), with the names
docs/metrics.md gives sft; eval/ figures at step 0 and every eval_every steps.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from advantage.lm.config import LMConfig, mixed_precision, validate_lm
from advantage.lm.data import load_rows, sft_pairs
from advantage.lm.data_order import DataOrder, fingerprint, task_files, total_steps
from advantage.lm.examples import (
    SFTExample,
    TokenBatch,
    collate_examples,
    completion_tokens,
    keep_trainable,
    pack_examples,
    tokenize_pairs,
)
from advantage.lm.generation import greedy_decode
from advantage.lm.loading import add_lora, end_ids, load_policy, max_length, pad_id
from advantage.lm.logprobs import masked_log_probs
from advantage.lm.models import evaluation_mode, model_device
from advantage.lm.offline import BatchGradient, train_offline
from advantage.lm.schedule import make_optimizer
from advantage.lm.session import LMSession
from advantage.lm.sharding import is_sharded, shard
from advantage.lm.tokenizer import end_token_ids, strip_end_tokens
from advantage.objectives.masking import aggregate
from advantage.run.config import param, require
from advantage.run.processes import Processes, to_device
from advantage.run.session import Run


@dataclass
class SFTConfig(LMConfig):
    """SFT's hyperparameters (every LMConfig field, plus packing and the evaluation's generation length)."""

    packing: bool = param(False, "pack each micro-batch's examples into rows of max_length tokens, attention "
                                 "isolated per example (same loss, less padding)")
    max_new_tokens: int = param(0, "tokens generated per held-out prompt for exact match; 0 = the longest "
                                   "reference completion (with its end token)")


CONFIG = SFTConfig


def validate(config: SFTConfig) -> None:
    """Reject invalid hyperparameters with a one-line error naming the field."""
    validate_lm(config)
    require(config.max_new_tokens >= 0, "max_new_tokens", "must be >= 0", config.max_new_tokens)


# -------------------------------------------------------------------------------------------------------------- loss


def completion_nll(model: nn.Module, batch: TokenBatch, num_tokens: int) -> Tensor:
    """This micro-batch's share of the SFT loss: - sum of log pi(a_t | s_t) over its completion tokens / num_tokens.

    Args:
        model: a causal LM (or a PEFT model around one).
        batch: a micro-batch from `collate_examples` or `pack_examples`.
        num_tokens: completion tokens of the whole batch (all micro-batches), so that the shares add up to the
            token-level mean of the batch.
    """
    # (B, T): log pi(x_t | x_<t) at the completion tokens, the actions of docs/math.md §5 (the head runs on those alone)
    log_probs = masked_log_probs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.loss_mask)
    return aggregate(-log_probs, batch.loss_mask, "token", num_tokens=max(num_tokens, 1))


def _embedding_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def accumulate_gradients(model: nn.Module, examples: Sequence[SFTExample], micro_batches: int, pad: int,
                         pack_length: int = 0, processes: Processes | None = None) -> tuple[float, int, int]:
    """Add the gradient of the batch's SFT loss to `.grad`, one micro-batch at a time.

    Args:
        examples: this process's share of the batch.
        micro_batches: how many consecutive micro-batches to split it into (must divide len(examples)).
        pad: the pad id.
        pack_length: 0 for one example per row, else pack each micro-batch into rows of this many tokens.
        processes: the processes sharing the batch (their gradients are summed afterwards); None for this one.

    Returns:
        (loss, completion tokens, real tokens): this share's part of the batch's loss L, the normaliser N_tokens
        (of the whole batch), and the tokens seen.
    """
    # Counted over the whole batch (every process's share) before any micro-batch: exact accumulation.
    num_tokens = completion_tokens(examples)
    if processes is not None:
        num_tokens = int(processes.sum(num_tokens)[0])
    size = len(examples) // micro_batches
    loss_total, real_tokens = 0.0, 0
    for start in range(0, len(examples), size):
        micro = examples[start:start + size]
        batch = to_device(pack_examples(micro, pack_length, pad, _embedding_dtype(model)) if pack_length
                          else collate_examples(micro, pad), model_device(model))
        loss = completion_nll(model, batch, num_tokens)  # this micro-batch's share of L
        loss.backward()  # accumulate: .grad sums the shares into the gradient of L
        loss_total += float(loss.detach())
        real_tokens += batch.real_tokens
    return loss_total, num_tokens, real_tokens


# -------------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: Sequence[SFTExample], batch_size: int, pad: int,
             max_new_tokens: int = 0, end_ids: Sequence[int] | None = None, cuda_graph: bool = True
             ) -> dict[str, float]:
    """eval/nll (token-mean NLL of the held-out completions) and eval/exact_match (greedy decoding).

    A completion matches when the decoded text of the greedy tokens before their end token equals the decoded
    reference (without its end token), both stripped of surrounding whitespace.
    """
    with evaluation_mode(model):
        num_tokens = completion_tokens(examples)
        nll = sum(float(completion_nll(model, to_device(collate_examples(examples[start:start + batch_size], pad),
                                                        model_device(model)), num_tokens))
                  for start in range(0, len(examples), batch_size))
        ends = tuple(end_ids) if end_ids else end_token_ids(tokenizer)
        budget = max_new_tokens or max(len(example.completion_ids) for example in examples)
        generated = greedy_decode(model, [example.prompt_ids for example in examples], max_new_tokens=budget,
                                  eos_id=ends, pad_id=pad, batch_size=batch_size, cuda_graph=cuda_graph)
        outputs = [strip_end_tokens(completion, ends) for completion in generated.completions]
        references = [strip_end_tokens(example.completion_ids, ends) for example in examples]
        matches = [tokenizer.decode(output, skip_special_tokens=True).strip()
                   == tokenizer.decode(reference, skip_special_tokens=True).strip()
                   for output, reference in zip(outputs, references)]
    return {"eval/nll": nll, "eval/exact_match": sum(matches) / len(matches)}


# ---------------------------------------------------------------------------------------------------------- training


def _data_paths(config: SFTConfig, run_dir: Path) -> tuple[str, str]:
    if config.task != "none":
        files = task_files(config, run_dir)
        return str(files["sft_train"]), str(files["sft_eval"])
    return config.data, config.eval_data


def _examples(rows, tokenizer, length: int, what: str, end_ids: Sequence[int]) -> list[SFTExample]:
    examples, cut = tokenize_pairs(sft_pairs(rows, tokenizer), tokenizer, length, end_ids)
    keep = keep_trainable([bool(example.completion_ids) for example in examples], [row.where for row in rows],
                          length, what, "examples")
    if cut:
        print(f"advantage: {cut} of {len(examples)} {what} examples are longer than max_length={length} tokens "
              f"and were cut at the right", file=sys.stderr)
    return [examples[index] for index in keep]


def train(config: SFTConfig, run_dir: str | Path, resume: bool = False) -> Run:
    """Fine-tune `config.model` on the completions of `config.data` (or the built-in task); write the run directory.

    Returns:
        The Run, whose `.model` is the trained model as saved in final/ (merged, with LoRA and lora_merge).
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    session = LMSession("sft", config, run_dir, resume)
    train_path, eval_path = _data_paths(config, session.run_dir)
    train_rows = load_rows(train_path, "sft")  # malformed data stops the run here, before the model loads
    eval_rows = load_rows(eval_path, "sft") if eval_path else []
    model, tokenizer = load_policy(config, session.processes.device)
    pad, length, ends = pad_id(tokenizer), max_length(config, model), end_ids(tokenizer, model)
    train_examples = _examples(train_rows, tokenizer, length, "training", ends)
    eval_examples = _examples(eval_rows, tokenizer, length, "evaluation", ends) if eval_rows else []
    eval_examples = eval_examples[:config.eval_max_prompts or None]
    if config.lora_r:
        model = add_lora(model, config)
    processes = session.processes
    if config.sharding == "fsdp":
        model = shard(model, processes.world_size)
    torch.manual_seed(config.seed)  # the global RNG drives dropout (LoRA's included); checkpoints carry its state
    optimizer = make_optimizer(model, config)
    steps = total_steps(config, len(train_examples))
    order = DataOrder(len(train_examples), config.batch_size, config.seed, processes.rank, processes.world_size)
    data_id = fingerprint([[e.prompt_ids, e.completion_ids] for e in train_examples])
    session.start(model, optimizer, steps, data_id)
    micro_size = config.batch_size // (processes.world_size * config.gradient_accumulation_steps)
    # Rank 0 alone evaluates, unless the model is sharded: then every process takes part in each forward pass.
    evaluating = bool(eval_examples) and (processes.is_main or is_sharded(model))

    def held_out() -> dict[str, float]:
        with mixed_precision(config):
            return evaluate(model, tokenizer, eval_examples, micro_size, pad, config.max_new_tokens, ends,
                            config.cuda_graphs)

    def accumulate(indices: Sequence[int]) -> BatchGradient:
        # Collate the batch's micro-batches, compute each one's share of L, accumulate the gradients.
        loss, num_tokens, real_tokens = accumulate_gradients(
            model, [train_examples[index] for index in indices], config.gradient_accumulation_steps, pad,
            length if config.packing else 0, processes)
        return BatchGradient(loss, real_tokens, completion_tokens=num_tokens)

    step, last = train_offline(session, model, optimizer, order, steps, config, "losses/nll", accumulate,
                               held_out if evaluating else None, lambda step: {"data_order": order.state(step)})
    model = session.finish(model, tokenizer, step)
    return Run(session.run_dir, "sft", config, last, step, model, tokenizer)
