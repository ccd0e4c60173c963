"""The fields every language-model stage has (`LMConfig`), their checks, and the precision they ask for.

Names, used the same way in every stage:
- an optimizer *step* is one update of the parameters; `step` in metrics.jsonl counts optimizer steps;
- the *batch* is the `batch_size` examples one step learns from (all processes together under torchrun);
- a *micro-batch* is the part of the batch that goes through one forward and backward pass:
  batch_size / gradient_accumulation_steps examples. Gradients of the micro-batches add up in `.grad`.

This differs from TRL/transformers, whose `per_device_train_batch_size` is our micro-batch: here `batch_size` is the
hyperparameter that shapes learning, and `gradient_accumulation_steps` is only a memory knob that never changes
the result (every loss is normalised by counts over the whole batch, not per micro-batch).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from advantage.run.config import param, require
from advantage.run.processes import DEVICES_HELP, resolve_device

BUILTIN_PREFIX = "builtin:"


DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class LMConfig:
    """Fields every language-model stage has."""

    model: str = param("builtin:small", "a local Hugging Face model directory (model + tokenizer), a .gguf file "
                                        "(dequantised on load; `advantage fetch-model`), or builtin:nano|tiny|small "
                                        "(random weights, character tokenizer; append -llama for the Llama "
                                        "architecture, e.g. builtin:nano-llama)")
    data: str = param("", "training data: a .jsonl or .parquet file or a datasets directory (TRL columns)")
    eval_data: str = param("", "held-out data in the same format (empty: no evaluation unless --task)")
    task: Literal["none", "arithmetic"] = param("none", "a built-in task instead of --data: its train/eval files "
                                                        "are generated into RUN_DIR/data")
    task_max_operand: int = param(99, "arithmetic task: operands lie in 0..max_operand")
    task_max_second_operand: int = param(0, "arithmetic task: the second operand lies in 0..this (0: in "
                                            "0..task_max_operand like the first)")
    task_operations: str = param("+", "arithmetic task: operations to draw from, any of + - *")
    task_format: Literal["text", "chat"] = param(
        "text", "arithmetic task: text (\"23+58=\" -> \"81\", for the built-in models) or chat (conversational "
                "rows, \"What is 23 + 58?\" -> \"23 + 58 = 81\", with an answer column, for a chat model)")
    task_train_size: int = param(1000, "arithmetic task: training prompts")
    task_eval_size: int = param(100, "arithmetic task: held-out prompts (disjoint from the training ones)")
    seed: int = param(1, "seed of the initial weights (built-in models), LoRA initialisation and data order")
    learning_rate: float = param(1e-4, "AdamW peak learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = param("linear", "decay of the learning rate to 0 over "
                                                                           "the run, after the warm-up")
    warmup_steps: int = param(0, "optimizer steps of linear warm-up from 0 to learning_rate")
    weight_decay: float = param(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = param(1.0, "clip the global gradient norm to this (0 disables)")
    batch_size: int = param(8, "examples per optimizer step (the batch), split into gradient_accumulation_steps "
                               "micro-batches")
    gradient_accumulation_steps: int = param(1, "micro-batches per optimizer step (memory only: the result is "
                                                "the same for any value dividing batch_size)")
    epochs: float = param(1.0, "passes over the training data (used when max_steps is 0)")
    max_steps: int = param(0, "optimizer steps to train for; 0 = epochs x rows / batch_size, rounded up")
    max_length: int = param(0, "longest sequence in tokens (longer examples are cut at the right); "
                               "0 = the model's max_position_embeddings, at most 2048")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = param(
        "float32", "dtype of the trained weights (auto: as saved in the model directory)")
    mixed_precision: Literal["no", "bf16"] = param(
        "no", "bf16: forward and backward passes under torch.autocast in bfloat16 (weights, optimizer state and "
              "losses stay in float32); only faster on CPUs with bfloat16 instructions (AVX512-BF16, AMX)")
    gradient_checkpointing: bool = param(
        False, "keep only each layer's input in the forward pass and recompute the rest in the backward pass "
               "(activation memory / number of layers, about a third more compute; TRL's default for DPO and GRPO)")
    lora_r: int = param(0, "LoRA rank; 0 trains every weight")
    lora_alpha: float = param(16.0, "LoRA scale alpha (the update is alpha / r x B A)")
    lora_dropout: float = param(0.0, "dropout on the LoRA input")
    lora_target_modules: str = param(DEFAULT_LORA_TARGETS, "comma-separated module names LoRA adapts "
                                                           "('all-linear' for every linear layer)")
    lora_merge: bool = param(True, "final/ holds the merged model (plain transformers); false: the LoRA adapter "
                                   "(PEFT format) whose base model is the model directory or RUN_DIR/base_model")
    eval_every: int = param(0, "optimizer steps between evaluations; 0 = about every 10% of the run")
    eval_max_prompts: int = param(0, "held-out examples evaluated at each evaluation, the first ones of the held-out "
                                     "data (0: all)")
    log_every: int = param(1, "optimizer steps between metrics lines (values are averaged over them)")
    checkpoint_every: int = param(0, "optimizer steps between checkpoints; 0 = about every 10% of the run")
    keep_checkpoints: int = param(2, "how many of the newest checkpoints to keep")
    max_nonfinite: int = param(5, "stop after this many consecutive steps with a non-finite loss")
    device: str = param("auto", f"where the models and batches live: {DEVICES_HELP}")
    sharding: Literal["none", "fsdp"] = param(
        "none", "under torchrun: none keeps a whole copy of the model, its gradients and optimizer state on every "
                "process (data parallel); fsdp shards the three over the processes with torch FSDP2 (rlhf: with "
                "value_model separate)")
    cuda_graphs: bool = param(True, "on a GPU, sampling and held-out decoding capture their decoding step once as "
                                    "a CUDA graph and replay it (one launch instead of hundreds of small kernels), "
                                    "and DPO, GRPO and the reward model their forward and backward pass of each "
                                    "batch shape; false: one kernel at a time. No effect on a CPU")
    threads: int = param(0, "torch threads; 0 leaves torch's default")
    tensorboard: bool = param(True, "also write TensorBoard event files")
    progress: bool = param(True, "show progress (a live bar on a terminal, periodic lines otherwise)")


def validate_lm(config: LMConfig) -> None:
    """Checks shared by every stage (each stage adds its own)."""
    require(bool(config.model.strip()), "model", "must name a directory or builtin:SIZE", config.model)
    require(config.learning_rate > 0 and math.isfinite(config.learning_rate), "learning_rate", "must be > 0",
            config.learning_rate)
    require(config.warmup_steps >= 0, "warmup_steps", "must be >= 0", config.warmup_steps)
    require(config.weight_decay >= 0, "weight_decay", "must be >= 0", config.weight_decay)
    require(config.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", config.max_grad_norm)
    require(config.batch_size >= 1, "batch_size", "must be >= 1", config.batch_size)
    require(config.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1",
            config.gradient_accumulation_steps)
    require(config.batch_size % config.gradient_accumulation_steps == 0, "gradient_accumulation_steps",
            f"must divide batch_size ({config.batch_size})", config.gradient_accumulation_steps)
    require(config.epochs > 0, "epochs", "must be > 0", config.epochs)
    require(config.max_steps >= 0, "max_steps", "must be >= 0", config.max_steps)
    require(config.max_length >= 0, "max_length", "must be >= 0 (0 = the model's limit)", config.max_length)
    require(config.lora_r >= 0, "lora_r", "must be >= 0", config.lora_r)
    require(config.lora_alpha > 0, "lora_alpha", "must be > 0", config.lora_alpha)
    require(0 <= config.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", config.lora_dropout)
    require(config.eval_every >= 0, "eval_every", "must be >= 0", config.eval_every)
    require(config.eval_max_prompts >= 0, "eval_max_prompts", "must be >= 0", config.eval_max_prompts)
    require(config.log_every >= 1, "log_every", "must be >= 1", config.log_every)
    require(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0", config.checkpoint_every)
    require(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", config.keep_checkpoints)
    require(config.max_nonfinite >= 1, "max_nonfinite", "must be >= 1", config.max_nonfinite)
    require(config.threads >= 0, "threads", "must be >= 0", config.threads)
    if config.task == "none":
        require(bool(config.data), "data", "is required (a data file, or --task arithmetic)", config.data)
    else:
        require(not config.data, "data", "must be empty when a built-in task supplies the data", config.data)
        require(not config.eval_data, "eval_data", "must be empty when a built-in task supplies the data",
                config.eval_data)
        require(config.task_train_size >= 1, "task_train_size", "must be >= 1", config.task_train_size)
        require(config.task_eval_size >= 1, "task_eval_size", "must be >= 1", config.task_eval_size)
        require(config.task_max_second_operand >= 0, "task_max_second_operand", "must be >= 0",
                config.task_max_second_operand)


def mixed_precision(config: LMConfig) -> contextlib.AbstractContextManager:
    """The autocast context of `config.mixed_precision` ("bf16": matrix products in bfloat16) on the device of
    `config.device` (an autocast context acts on one device type only), or a no-op."""
    if config.mixed_precision == "bf16":
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
