"""The policy a stage trains: a built-in model or a local Hugging Face directory (or .gguf file), optionally
wrapped in LoRA adapters, with its end tokens, pad token and context length."""

from __future__ import annotations

import os
import warnings

import torch

from advantage.errors import UsageError
from advantage.lm.config import BUILTIN_PREFIX, LMConfig
from advantage.lm.models import quiet_transformers
from advantage.run.config import require
from advantage.run.processes import resolve_device


def load_policy(config: LMConfig, device: torch.device | None = None):
    """The model to train and its tokenizer, as `config.model` names them, in `config.dtype`, in train mode, on
    `device` (default: the one `config.device` names for this process, `run.processes.resolve_device`).

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
    if device is None:
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    return model.to(device).train(), tokenizer


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
