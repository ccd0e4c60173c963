"""The run of a language-model stage (sft, reward, dpo, grpo, rlhf): its directory, metrics, checkpoints, exact
resume and final/, the optimizer step every stage takes, and `train` / `resume` by stage name.

What a stage is built from lives beside it: lm/config.py (the fields every stage has), lm/loading.py (the policy
and LoRA), lm/data_order.py (what each step learns from), lm/schedule.py (optimizer and learning rate),
run/processes.py (the processes training together).

Exact resume. A checkpoint holds the trainable parameters, the optimizer state, the global torch RNG state and the
step; the data order is a pure function of (seed, step) (see `DataOrder`), and the learning rate a pure function of
the step. A run resumed from its last checkpoint therefore repeats exactly what the uninterrupted run did.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from advantage.errors import UsageError
from advantage.lm.config import BUILTIN_PREFIX, LMConfig
from advantage.lm.loading import load_policy
from advantage.lm.models import quiet_transformers
from advantage.lm.sharding import checkpoint_state, gathered_full_state, is_sharded, restore_checkpoint_state
from advantage.run.checkpoint import (
    interval,
    read_checkpoint,
    removed_if_it_fails,
    save_checkpoint,
)
from advantage.run.config import apply_overrides, load_config_file, load_yaml_mapping, resumed_config
from advantage.run.session import Run, RunSession, default_run_dir

STAGES = ("sft", "reward", "dpo", "grpo", "rlhf")


# --------------------------------------------------------------------------------------------------------- session


class _Tensors:
    """Tensors already taken from a model (a sharded model's gathered full weights, or the trainable ones of an
    unsharded model), looking like a module to `save_checkpoint`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> tensor."""
        return self.tensors


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
            norm = nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], max_norm)
            # Sharded (FSDP2) gradients give the norm of all the slices as a DTensor: the same number everywhere.
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
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


class LMSession(RunSession):
    """The run directory of one language-model stage, fresh or resumed (`run.session.RunSession`), whose steps are
    optimizer steps over batches shared by the processes.

    Args:
        stage: name written to config.yaml ("sft", ...).
        config: the resolved config.
        run_dir: where to write.
        resume: continue from the newest checkpoint in run_dir.
    """

    unit = "steps"

    def __init__(self, stage: str, config: LMConfig, run_dir: str | Path, resume: bool):
        super().__init__(stage, config, run_dir, resume)
        self.stage = stage
        shards = self.processes.world_size * config.gradient_accumulation_steps
        if config.batch_size % shards:
            raise UsageError(f"field 'batch_size' must be a multiple of processes x gradient_accumulation_steps "
                             f"({self.processes.world_size} x {config.gradient_accumulation_steps}), "
                             f"got {config.batch_size}")
        self.processes.barrier()  # every process has checked the directory before rank 0 writes into it
        self.steps = 0
        self.checkpoint_every = self.eval_every = 1

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
        self._model, self._optimizer, self._fingerprint = model, optimizer, data_fingerprint
        self._trainable = _TrainableParameters(model)
        self.steps = steps
        self.checkpoint_every = interval(self.config.checkpoint_every, steps)
        self.eval_every = interval(self.config.eval_every, steps)
        self.write_config()
        state = None
        if self.checkpoint_path is not None:
            tensors, state = read_checkpoint(self.checkpoint_path)
            if state.get("data_fingerprint") != data_fingerprint:
                raise UsageError(f"{self.checkpoint_path}: the training data (or tokenizer, or max_length) changed "
                                 f"since this checkpoint; exact resume needs the same data")
            weights = {key.removeprefix("model."): value for key, value in tensors.items()}
            # A checkpoint holds whole tensors and, written by a sharded run, the optimizer state keyed by parameter
            # name: it resumes sharded or not, on any number of processes (lm/sharding.py).
            restore_checkpoint_state(model, optimizer, weights, state["optimizer"],
                                     state.get("optimizer_keys") == "names", plain=self._trainable)
            self.restore_common(state)
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and self.processes.device.type == "cuda":  # dropout on a GPU draws from it
                torch.cuda.set_rng_state(state["cuda_rng"], self.processes.device)
        self.open_writers(steps, f"{self.stage} {self.config.model}", episodes=False, resumed=self.resume)
        return state

    def evaluation_due(self, step: int) -> bool:
        """True before training (step 0), every `eval_every` steps, and after the last step."""
        return step % self.eval_every == 0 or step == self.steps

    def checkpoint_due(self, step: int) -> bool:
        """True every `checkpoint_every` steps and after the last step."""
        return step % self.checkpoint_every == 0 or step == self.steps

    def save(self, step: int, extra: dict[str, Any] | None = None) -> None:
        """Flush the logs; checkpoint the trainable parameters, optimizer, RNG and counters after `step` steps."""
        assert self.metrics is not None
        # Sharded, every process gives its slices and rank 0 receives the whole tensors.
        weights, optimizer_state, by_name = checkpoint_state(self._model, self._optimizer, plain=self._trainable)
        if not self.processes.is_main:  # the other processes hold the same weights and state (or their slices)
            return
        self.metrics.flush()
        state = {**self.common_state(step), "optimizer": optimizer_state,
                 **({"optimizer_keys": "names"} if by_name else {}),
                 "torch_rng": torch.get_rng_state(),
                 **({"cuda_rng": torch.cuda.get_rng_state(self.processes.device)}
                    if self.processes.device.type == "cuda" else {}),
                 "data_fingerprint": self._fingerprint, **(extra or {})}
        save_checkpoint(self.run_dir, step, {"model": _Tensors(weights)}, state,
                        keep=self.config.keep_checkpoints)

    def _unsharded_copy(self, full: dict[str, torch.Tensor], scalar_head: bool) -> nn.Module:
        """A plain model on the CPU, built as the stage built its own (LoRA included), holding the `full` weights of a
        sharded one; `scalar_head`: a reward model (a scalar head on the policy's body), its adapters merged as the
        reward stage merges its own."""
        from advantage.lm.loading import add_lora
        from advantage.lm.models import ScalarHeadModel

        policy = load_policy(self.config, torch.device("cpu"))[0]
        lora_model = add_lora(policy, self.config) if self.config.lora_r else None
        model = lora_model or policy
        if scalar_head:
            model = ScalarHeadModel.from_causal_lm(lora_model.get_base_model() if lora_model else policy,
                                                   share_body=True)
        missing, unexpected = model.load_state_dict(full, strict=False)
        # Tied weights (the language-model head sharing the embeddings) may appear under one of their names only.
        tied = {name for name in missing if name.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}")
        if scalar_head and lora_model is not None:
            lora_model.merge_and_unload()  # into the shared body, in place
        return model

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

        if is_sharded(model):  # rank 0 puts the gathered weights into an unsharded copy on the CPU and saves that
            full = gathered_full_state(model)
            if self.processes.is_main:
                model = self._unsharded_copy(full, isinstance(model, ScalarHeadModel))
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
                        base_model = load_policy(self.config, torch.device("cpu"))[0]
                        base = str(save_pretrained(base_model, tokenizer, self.run_dir / "base_model").absolute())
                    else:
                        base = str(Path(base).absolute())
                    for adapter in model.peft_config.values():
                        adapter.base_model_name_or_path = base
                save_pretrained(model, tokenizer, self.run_dir / "final")
        self.close_writers(f"{self.stage} {self.config.model}: {step} steps in {self.elapsed():.1f} s "
                           f"-> {self.run_dir}")
        self.processes.barrier()  # final/ is complete before any process returns
        return model


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


def stage_run_dir(stage: str, config: LMConfig) -> Path:
    """runs/STAGE-MODEL-seedS, MODEL being the built-in name or the model directory's name."""
    name = config.model.replace(BUILTIN_PREFIX, "builtin-") if config.model.startswith(BUILTIN_PREFIX) \
        else Path(config.model).name.removesuffix(".gguf")
    return default_run_dir(stage, name, config.seed)


def train(stage: str, out: str | Path | None = None, config_file: str | Path | None = None, **fields: Any) -> Run:
    """Run a language-model stage ("sft", "reward", "dpo", "grpo", "rlhf") and return its Run; `fields` are any
    fields of the stage's config."""
    config = resolve_config(stage, fields, config_file)
    out = Path(out) if out else stage_run_dir(stage, config)
    with removed_if_it_fails(out):
        return stage_module(stage).train(config, out)


def resume(run_dir: str | Path, stage: str | None = None, **fields: Any) -> Run:
    """Continue the run in `run_dir` from its last checkpoint (fields may override, e.g. a larger max_steps)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir}: no config.yaml there (not a run directory)")
    saved = load_yaml_mapping(run_dir / "config.yaml")
    name = str(saved.pop("algorithm", None))
    if stage is not None and name != stage:
        raise UsageError(f"--resume {run_dir}: that run is '{name}', not '{stage}'")
    module = stage_module(name)
    config = resumed_config(module.CONFIG(), saved, run_dir / "config.yaml", fields)
    return module.train(config, run_dir, resume=True)
