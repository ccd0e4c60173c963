"""What every language-model stage shares (sft, reward, dpo, grpo, rlhf): the base config, the policy
model (built-in or a local Hugging Face directory, optionally with LoRA), the data order, the learning-rate
schedule, and the run session (directory, metrics, checkpoints, exact resume, final/).

Names, used the same way in every stage:
- an optimizer *step* is one update of the parameters; `step` in metrics.jsonl counts optimizer steps;
- the *batch* is the `batch_size` examples one step learns from (all processes together under torchrun);
- a *micro-batch* is the part of the batch that goes through one forward and backward pass:
  batch_size / gradient_accumulation_steps examples. Gradients of the micro-batches add up in `.grad`.

This differs from TRL/transformers, whose `per_device_train_batch_size` is our micro-batch: here `batch_size` is the
hyperparameter that shapes learning, and `gradient_accumulation_steps` is only a memory knob that never changes
the result (every loss is normalised by counts over the whole batch, not per micro-batch).

Exact resume. A checkpoint holds the trainable parameters, the optimizer state, the global torch RNG state and the
step; the data order is a pure function of (seed, step) (see `DataOrder`), and the learning rate a pure function of
the step. A run resumed from its last checkpoint therefore repeats exactly what the uninterrupted run did.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from advantage.errors import NonFiniteLossError, UsageError
from advantage.lm.models import quiet_transformers
from advantage.run.checkpoint import (
    check_run_directory,
    list_checkpoints,
    load_checkpoint,
    removed_if_it_fails,
    save_checkpoint,
)
from advantage.run.config import apply_overrides, load_config_file, load_yaml_mapping, param, save_config
from advantage.run.metrics import MetricsWriter, truncate_jsonl
from advantage.run.progress import Progress
from advantage.run.seeding import derive_seed

STAGES = ("sft", "reward", "dpo", "grpo", "rlhf")
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
    threads: int = param(0, "torch threads; 0 leaves torch's default")
    tensorboard: bool = param(True, "also write TensorBoard event files")
    progress: bool = param(True, "show progress (a live bar on a terminal, periodic lines otherwise)")


def mixed_precision(config: LMConfig) -> contextlib.AbstractContextManager:
    """The autocast context of `config.mixed_precision` ("bf16": matrix products in bfloat16), or a no-op."""
    if config.mixed_precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, config: LMConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in its fused implementation (one kernel for every tensor: 5x faster
    than the per-tensor loop on a 4M-parameter model on CPU) where the parameters' device and dtype allow it."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        return torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)


def require(condition: bool, field: str, message: str, value: Any) -> None:
    """Raise UsageError naming `field` unless `condition` holds."""
    if not condition:
        raise UsageError(f"field '{field}' {message}, got {value!r}")


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



# ---------------------------------------------------------------------------------------------------------- models


def load_policy(config: LMConfig):
    """The model to train and its tokenizer, as `config.model` names them, in `config.dtype`, in train mode.

    "builtin:SIZE[-ARCH]" builds a model with random weights from `config.seed` and the character tokenizer;
    anything else is a local Hugging Face directory loaded offline.

    Raises:
        UsageError: an unknown built-in size or architecture, or a directory that does not hold a model.
    """
    from advantage.lm.models import build_model, load_causal_lm
    from advantage.lm.tokenizer import build_char_tokenizer

    with quiet_transformers():
        if config.model.startswith(BUILTIN_PREFIX):
            size, _, architecture = config.model[len(BUILTIN_PREFIX):].partition("-")
            tokenizer = build_char_tokenizer()
            model = build_model(size, architecture or "qwen2", tokenizer, seed=config.seed)
            if config.dtype not in ("auto", "float32"):
                model = model.to(getattr(torch, config.dtype))
        else:
            model, tokenizer = load_causal_lm(config.model, dtype=config.dtype)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {config.model!r} has no eos token (needed to end completions)")
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA adapters without the inputs requiring grad. transformers
        # renamed the method in 5.x (the old name warns).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer


def pad_id(tokenizer) -> int:
    """The id written at padded positions: the pad token, or EOS for tokenizers without one (padding is masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def end_ids(tokenizer, model) -> tuple[int, ...]:
    """The ids that end a completion for this model: its tokenizer's EOS first, then its generation config's
    end tokens (`tokenizer.end_token_ids`)."""
    from advantage.lm.tokenizer import end_token_ids

    return end_token_ids(tokenizer, getattr(model, "generation_config", None))


def add_lora(model, config: LMConfig):
    """Wrap `model` in a PEFT LoRA model (only the adapters train); the adapters' initialisation is seeded."""
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
    require(bool(targets), "lora_target_modules", "must name at least one module", config.lora_target_modules)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(config.seed)
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers method deprecated in 5.x
        try:
            return get_peft_model(model, lora)
        except ValueError as error:
            reason = " ".join(str(error).split())[:200]
            raise UsageError(f"field 'lora_target_modules': {reason}") from None


def max_length(config: LMConfig, model) -> int:
    """The longest sequence: `config.max_length`, or the model's position limit capped at 2048."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if config.max_length:
        if positions and config.max_length > positions:
            raise UsageError(f"field 'max_length' ({config.max_length}) is beyond the {positions} positions of model "
                             f"'{config.model}'")
        return config.max_length
    return min(int(positions or 2048), 2048)


# ------------------------------------------------------------------------------------------------------------ data


def task_files(config: LMConfig, run_dir: Path) -> dict[str, Path]:
    """Write the built-in task's files into RUN_DIR/data (once; they depend only on the config) and return them."""
    from advantage.lm.tasks import ArithmeticTask

    task = ArithmeticTask(max_operand=config.task_max_operand, operations=config.task_operations,
                          max_second_operand=config.task_max_second_operand or None,
                          chat=config.task_format == "chat")
    directory = run_dir / "data"
    names = [f"{kind}_{split}" for kind in ("sft", "preference", "ranking") for split in ("train", "eval")]
    if all((directory / f"{name}.jsonl").is_file() for name in names):
        return {name: directory / f"{name}.jsonl" for name in names}
    return task.write_task_files(directory, config.task_train_size, config.task_eval_size, seed=config.seed)


def fingerprint(items: Sequence[Any]) -> str:
    """A short hash of the tokenized training data: a resumed run refuses data that changed under it."""
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()[:16]


class Processes:
    """The processes training together, or just this one.

    Launched by torchrun (or `accelerate launch`), which sets WORLD_SIZE, RANK and the rendezvous address, every
    stage trains with data parallelism over torch.distributed: each process takes its share of every batch
    (`DataOrder`), the gradients are summed over the processes before the optimizer step, and every process then
    takes the same step, so the weights stay identical everywhere. Losses are normalised by counts over the whole
    batch of all processes, so N processes compute the gradient of one process with the same batch. Only rank 0
    writes the run directory and shows progress. Without WORLD_SIZE > 1 nothing of torch.distributed is touched.
    """

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world_size > 1 else 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes the run directory (rank 0)."""
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (float64, so token counts stay exact)."""
        if self.world_size == 1:
            return [float(value) for value in values]
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_gradients(self, model: nn.Module) -> None:
        """Replace every trainable parameter's .grad by its sum over the processes, in one all-reduce."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        offset = 0
        for parameter, grad in zip([p for p in model.parameters() if p.requires_grad], grads):
            parameter.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def gather_rows(self, local: Tensor, total: int) -> Tensor:
        """Interleave the rows each process computed for its share `range(rank, total, world_size)` of `total` items.

        Args:
            local: (ceil((total - rank) / world_size), ...) this process's rows, in the order of its share.
        Returns:
            (total, ...) every item's row, in the original order.
        """
        if self.world_size == 1:
            return local
        most = -(-total // self.world_size)
        padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype)
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        result = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
        for rank, rows in enumerate(gathered):
            result[rank::self.world_size] = rows[:len(range(rank, total, self.world_size))]
        return result

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            dist.barrier()


def close_processes() -> None:
    """Leave torch.distributed's process group if a stage joined one (at the end of a torchrun-launched command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DataOrder:
    """Which examples each optimizer step learns from, as a pure function of (seed, step).

    Every epoch is a fresh permutation of the N examples drawn from a generator seeded with (seed, epoch); the
    concatenation of the epochs' permutations is cut into consecutive batches of `batch_size`, so batch k holds
    positions k * batch_size .. (k + 1) * batch_size - 1 of that stream (a batch may span two epochs). Nothing needs
    saving to resume: the step says where the stream is.

    This is also the one place the data is sharded: with `world_size` processes (`Processes`), rank r takes every
    world_size-th example of each batch, so the ranks together see exactly the single-process batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise UsageError("no training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._permutations = {epoch: torch.randperm(self.num_examples, generator=generator).tolist()}
        return self._permutations[epoch]

    def batch(self, step: int) -> list[int]:
        """Indices of the examples of optimizer step `step` (0-based) that this process handles."""
        indices = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_examples)
            indices.append(self._permutation(epoch)[offset])
        return indices[self.rank::self.world_size]

    def state(self, steps: int) -> dict[str, int]:
        """Where the stream is after `steps` steps (checkpointed for inspection; resuming recomputes it)."""
        epoch, offset = divmod(steps * self.batch_size, self.num_examples)
        return {"seed": self.seed, "num_examples": self.num_examples, "epoch": epoch, "offset": offset}

    def epochs_done(self, steps: int) -> float:
        """Passes over the data after `steps` optimizer steps."""
        return steps * self.batch_size / self.num_examples


def total_steps(config: LMConfig, num_examples: int) -> int:
    """`max_steps`, or enough steps for `epochs` passes over `num_examples` examples."""
    return config.max_steps or max(1, math.ceil(config.epochs * num_examples / config.batch_size))


def learning_rate_at(config: LMConfig, step: int, steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `steps`: linear warm-up, then the decay schedule.

    A pure function of the step, so resuming needs no scheduler state.
    """
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = max(0, step - config.warmup_steps) / max(1, steps - config.warmup_steps)
    decay = {"constant": 1.0, "linear": 1.0 - progress,
             "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[config.lr_schedule]
    return config.learning_rate * warmup * decay


def interval(every: int, steps: int) -> int:
    """`every`, or about a tenth of the run when it is 0."""
    return every or max(1, math.ceil(steps / 10))


# --------------------------------------------------------------------------------------------------------- session


class _TrainableParameters:
    """The trainable parameters of a model, looking like a module to the checkpoint functions.

    Checkpoints hold only what training changes: every weight when fine-tuning fully, only the adapters with LoRA
    (a few MB instead of the whole model). Buffers (e.g. rotary frequencies) are rebuilt by the model itself.
    """

    def __init__(self, model: nn.Module):
        self.parameters = {name: parameter for name, parameter in model.named_parameters()
                           if parameter.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> tensor of every trainable parameter."""
        return {name: parameter.detach() for name, parameter in self.parameters.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy saved values into the parameters; every name must match."""
        if strict and set(tensors) != set(self.parameters):
            missing, unexpected = set(self.parameters) - set(tensors), set(tensors) - set(self.parameters)
            raise UsageError(f"checkpoint does not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}); was the model or LoRA setting changed?")
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.parameters[name].copy_(tensor)


@dataclass
class StepWindow:
    """The optimizer steps since the last metrics line: summed here, averaged into that line by `figures`.

    Every stage's step is the same: clip the accumulated gradient, step, zero it, unless the loss is not finite
    (then the step is skipped and counted by the session, seed-independent of which stage runs).
    """

    loss: float = 0.0
    grad_norm: float = 0.0
    finite: int = 0
    tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    def optimizer_step(self, session: "LMSession", optimizer: torch.optim.Optimizer, loss: float,
                       max_norm: float) -> bool:
        """One optimizer step on the accumulated gradients when `loss` is finite; always zeroes them after."""
        stepped = session.finite(loss)
        if stepped:
            grad_norm = float(nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], max_norm))
            optimizer.step()
            self.loss += loss
            self.grad_norm += grad_norm
            self.finite += 1
        optimizer.zero_grad(set_to_none=True)
        return stepped

    def end_step(self, tokens: int, seconds: float, completion_tokens: int = 0) -> None:
        """Count one optimizer step (taken or skipped): its real tokens, completion tokens and wall seconds."""
        self.tokens += tokens
        self.completion_tokens += completion_tokens
        self.steps += 1
        self.seconds += seconds

    def figures(self, loss_name: str) -> dict[str, float]:
        """Mean loss and gradient norm over the steps taken (NaN if none was), and tokens per second."""
        return {loss_name: self.loss / self.finite if self.finite else math.nan,
                "losses/grad_norm": self.grad_norm / self.finite if self.finite else math.nan,
                "charts/tokens_per_s": self.tokens / max(self.seconds, 1e-9)}


@dataclass
class LMRun:
    """What a stage's `train` returns: where the run is, its final metrics line and the trained model in memory."""

    run_dir: Path
    stage: str
    config: Any
    last_metrics: dict[str, Any]
    steps: int
    model: Any
    tokenizer: Any


class LMSession:
    """The run directory of one language-model stage, fresh or resumed.

    Constructing it only checks the directory (a fresh run must not overwrite another one); nothing is written
    until `start`, so a run stopped by bad data or a missing model leaves no half-made run directory behind.

    Args:
        stage: name written to config.yaml ("sft", ...).
        config: the resolved config.
        run_dir: where to write.
        resume: continue from the newest checkpoint in run_dir.
    """

    def __init__(self, stage: str, config: LMConfig, run_dir: str | Path, resume: bool):
        self.stage, self.config, self.run_dir = stage, config, Path(run_dir)
        self.resume = resume
        self.checkpoint_path: Path | None = None
        if resume:
            if not (self.run_dir / "config.yaml").exists():
                raise UsageError(f"{self.run_dir}: no config.yaml there (not a run directory)")
            checkpoints = list_checkpoints(self.run_dir)
            self.checkpoint_path = checkpoints[-1] if checkpoints else None
        elif (self.run_dir / "config.yaml").exists():
            raise UsageError(f"run directory '{self.run_dir}' already holds a run; pass --resume {self.run_dir} "
                             f"to continue it, or choose another --out")
        else:
            check_run_directory(self.run_dir)
        self.processes = Processes()
        shards = self.processes.world_size * config.gradient_accumulation_steps
        if config.batch_size % shards:
            raise UsageError(f"field 'batch_size' must be a multiple of processes x gradient_accumulation_steps "
                             f"({self.processes.world_size} x {config.gradient_accumulation_steps}), "
                             f"got {config.batch_size}")
        self.processes.barrier()  # every process has checked the directory before rank 0 writes into it
        self.start_step = 0
        self.steps = 0
        self.checkpoint_every = self.eval_every = 1
        self.elapsed_before = 0.0
        self.consecutive_nonfinite = 0
        self.skipped_updates = 0
        self.metrics: MetricsWriter | None = None
        self.progress: Progress | None = None
        self._clock_start = time.perf_counter()

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
              data_fingerprint: str) -> dict[str, Any] | None:
        """Write config.yaml, load the newest checkpoint when resuming, open metrics and progress.

        Args:
            model: the trained model; its trainable parameters are what checkpoints hold.
            optimizer: its state is checkpointed.
            steps: optimizer steps of the whole run (for the default checkpoint and evaluation intervals).
            data_fingerprint: `fingerprint` of the training data; a resumed run must see the same.
        Returns:
            The saved state (for the stage's own extra entries), or None on a fresh start.
        """
        self._trainable, self._optimizer, self._fingerprint = _TrainableParameters(model), optimizer, data_fingerprint
        self.steps = steps
        self.checkpoint_every = interval(self.config.checkpoint_every, steps)
        self.eval_every = interval(self.config.eval_every, steps)
        main = self.processes.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml", self.stage)
        state = None
        if self.checkpoint_path is not None:
            state = load_checkpoint(self.checkpoint_path, {"model": self._trainable})
            if state.get("data_fingerprint") != data_fingerprint:
                raise UsageError(f"{self.checkpoint_path}: the training data (or tokenizer, or max_length) changed "
                                 f"since this checkpoint; exact resume needs the same data")
            self.start_step = int(state["step"])
            self.elapsed_before = float(state["elapsed_s"])
            self.skipped_updates = int(state["skipped_updates"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
        elif self.resume and main:  # killed before its first checkpoint: start over, without the old lines
            truncate_jsonl(self.run_dir / "metrics.jsonl", -1)
        self.metrics = MetricsWriter(self.run_dir, resume_step=self.start_step if self.resume else None,
                                     tensorboard=self.config.tensorboard, episodes=False) if main else _Unwritten()
        self.progress = Progress(steps, self.start_step, f"{self.stage} {self.config.model}",
                                 enabled=self.config.progress and main)
        self._clock_start = time.perf_counter()
        return state

    def elapsed(self) -> float:
        """Wall seconds since the start of the run, carried across resumes."""
        return self.elapsed_before + time.perf_counter() - self._clock_start

    def finite(self, loss: float) -> bool:
        """False (and counted) if the loss is NaN or infinite: the caller skips that step.

        Raises NonFiniteLossError after `max_nonfinite` consecutive ones; the last checkpoint stays intact.
        """
        if math.isfinite(loss):
            self.consecutive_nonfinite = 0
            return True
        self.consecutive_nonfinite += 1
        self.skipped_updates += 1
        if self.consecutive_nonfinite >= self.config.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss; stopped. The last "
                f"checkpoint in {self.run_dir / 'checkpoints'} is intact (lower the learning rate)")
        return False

    def evaluation_due(self, step: int) -> bool:
        """True before training (step 0), every `eval_every` steps, and after the last step."""
        return step % self.eval_every == 0 or step == self.steps

    def checkpoint_due(self, step: int) -> bool:
        """True every `checkpoint_every` steps and after the last step."""
        return step % self.checkpoint_every == 0 or step == self.steps

    def save(self, step: int, extra: dict[str, Any] | None = None) -> None:
        """Flush the logs; checkpoint the trainable parameters, optimizer, RNG and counters after `step` steps."""
        assert self.metrics is not None
        if not self.processes.is_main:  # the other processes hold the same weights and state
            return
        self.metrics.flush()
        state = {"step": step, "elapsed_s": self.elapsed(), "skipped_updates": self.skipped_updates,
                 "optimizer": self._optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "data_fingerprint": self._fingerprint, **(extra or {})}
        save_checkpoint(self.run_dir, step, {"model": self._trainable}, state, keep=self.config.keep_checkpoints)

    def show(self, step: int, figures: dict[str, float]) -> None:
        """Move the progress display to `step` with a few figures."""
        assert self.progress is not None
        self.progress.update(step, figures)

    def finish(self, model, tokenizer, step: int):
        """Write final/ in Hugging Face format, close the writers, print where it went; return the final model.

        With LoRA and `lora_merge` (default) the adapters are merged into the weights and final/ is a plain
        transformers model; otherwise final/ holds the PEFT adapter, and a built-in base model is saved to
        RUN_DIR/base_model so that the adapter's base is a real directory. A `ScalarHeadModel` (the reward stage,
        whose adapters the stage merges itself) is written by its own `save_pretrained`: body, head and tokenizer,
        which `ScalarHeadModel.from_pretrained` reads back.
        """
        from advantage.lm.fetch import is_gguf
        from advantage.lm.models import ScalarHeadModel, save_pretrained

        if not self.processes.is_main:  # rank 0 writes final/; the weights are the same everywhere
            self.processes.barrier()
            return model
        with quiet_transformers():
            if isinstance(model, ScalarHeadModel):
                model.save_pretrained(self.run_dir / "final", tokenizer)
            else:
                if hasattr(model, "merge_and_unload") and self.config.lora_merge:
                    model = model.merge_and_unload()
                elif hasattr(model, "peft_config"):
                    base = self.config.model
                    if base.startswith(BUILTIN_PREFIX) or is_gguf(base):  # the adapter's base must be a directory
                        base_model = load_policy(self.config)[0]
                        base = str(save_pretrained(base_model, tokenizer, self.run_dir / "base_model").absolute())
                    else:
                        base = str(Path(base).absolute())
                    for adapter in model.peft_config.values():
                        adapter.base_model_name_or_path = base
                save_pretrained(model, tokenizer, self.run_dir / "final")
        if self.metrics is not None:
            self.metrics.close()
        if self.progress is not None:
            self.progress.close(f"{self.stage} {self.config.model}: {step} steps in {self.elapsed():.1f} s "
                                f"-> {self.run_dir}")
        self.processes.barrier()  # final/ is complete before any process returns
        return model


class _Unwritten:
    """The metrics writer of the processes other than rank 0: builds the same lines, writes nothing."""

    def log(self, step: int, time_s: float, values: dict[str, Any]) -> dict[str, Any]:
        return {"step": int(step), "time_s": round(float(time_s), 4), **values}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- configs and resuming


def stage_module(name: str) -> ModuleType:
    """The module implementing stage `name` (it has `CONFIG`, `train` and `validate`)."""
    if name not in STAGES:
        raise UsageError(f"unknown language-model stage '{name}'; expected one of {', '.join(STAGES)}")
    return importlib.import_module(f"advantage.lm.{name}")


def resolve_config(stage: str, fields: dict[str, Any], config_file: str | Path | None = None,
                   source: str = "arguments") -> Any:
    """The config of `stage`: its defaults < a YAML config file < `fields`."""
    config = stage_module(stage).CONFIG()
    if config_file:
        config = apply_overrides(config, load_config_file(config_file, stage), str(config_file))
    return apply_overrides(config, fields, source)


def default_run_dir(stage: str, config: LMConfig) -> Path:
    """runs/STAGE-MODEL-seedS, MODEL being the built-in name or the model directory's name."""
    name = config.model.replace(BUILTIN_PREFIX, "builtin-") if config.model.startswith(BUILTIN_PREFIX) \
        else Path(config.model).name.removesuffix(".gguf")
    return Path("runs") / f"{stage}-{name}-seed{config.seed}"


def train(stage: str, out: str | Path | None = None, config_file: str | Path | None = None, **fields: Any) -> LMRun:
    """Run a language-model stage ("sft", "reward", "dpo", "grpo", "rlhf") and return its LMRun; `fields` are any
    fields of the stage's config."""
    config = resolve_config(stage, fields, config_file)
    out = Path(out) if out else default_run_dir(stage, config)
    with removed_if_it_fails(out):
        return stage_module(stage).train(config, out)


def resume(run_dir: str | Path, stage: str | None = None, **fields: Any) -> LMRun:
    """Continue the run in `run_dir` from its last checkpoint (fields may override, e.g. a larger max_steps)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir}: no config.yaml there (not a run directory)")
    saved = load_yaml_mapping(run_dir / "config.yaml")
    name = str(saved.pop("algorithm", None))
    if stage is not None and name != stage:
        raise UsageError(f"--resume {run_dir}: that run is '{name}', not '{stage}'")
    module = stage_module(name)
    config = apply_overrides(module.CONFIG(), saved, str(run_dir / "config.yaml"))
    config = apply_overrides(config, fields, "arguments")
    return module.train(config, run_dir, resume=True)
