"""Small causal language models with random weights, loading and saving in Hugging Face format, and a scalar head.

Everything here is offline: models are built from a config (no download) or loaded from a local directory with
`local_files_only=True`. Saved directories are ordinary Hugging Face checkpoints (config.json, model.safetensors,
tokenizer files), so `transformers.AutoModelForCausalLM.from_pretrained(directory)` reads them too.

The named sizes (all tied input/output embeddings, multi-head attention, float32):

    size    hidden  layers  heads  MLP   max positions   parameters (qwen2, 101-token vocabulary)
    nano        64       2      2   256            128      0.14M
    tiny       128       3      4   512            256      0.80M
    small      256       4      4  1024            256      4.23M  (the peer benchmark's model)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from advantage.errors import UsageError
from advantage.lm.logprobs import SharedPromptBatch, position_ids_from_attention_mask, shared_prompt_forward
from advantage.lm.tokenizer import build_char_tokenizer, load_tokenizer

SIZES: dict[str, dict[str, int]] = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=128),
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512,
                 max_position_embeddings=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  max_position_embeddings=256),
}
ARCHITECTURES: tuple[str, ...] = ("qwen2", "llama")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SCALAR_HEAD_WEIGHTS = "scalar_head.safetensors"
SCALAR_HEAD_CONFIG = "scalar_head.json"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers while saving and loading (transformers 5 shows them by default): the
    library's own progress display is the only one, and `--progress false` means none."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _config_and_model_classes(architecture: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[architecture]


def build_model(size: str = "small", architecture: str = "qwen2", tokenizer=None, seed: int = 0,
                **config_overrides):
    """A causal LM with random weights: `Qwen2ForCausalLM` or `LlamaForCausalLM` at a named size.

    Args:
        size: "nano" | "tiny" | "small" (see the module docstring).
        architecture: "qwen2" (biases on q, k, v) | "llama" (no biases).
        tokenizer: sets vocab_size = len(tokenizer) and the pad/bos/eos ids; default `build_char_tokenizer()`.
        seed: the initial weights depend only on it (the global RNG is left untouched).
        **config_overrides: any field of the architecture's config (e.g. num_hidden_layers=1), or
            attn_implementation ("eager" | "sdpa").

    Raises:
        UsageError: unknown size, architecture or config field.
    """
    if size not in SIZES:
        raise UsageError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    if architecture not in ARCHITECTURES:
        raise UsageError(f"unknown model architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    config_class, model_class = _config_and_model_classes(architecture)
    unknown = sorted(set(config_overrides) - set(config_class().to_dict()) - {"attn_implementation"})
    if unknown:
        raise UsageError(f"unknown {architecture} config field(s) {', '.join(unknown)}")
    tokenizer = build_char_tokenizer() if tokenizer is None else tokenizer
    fields = dict(SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"], tie_word_embeddings=True,
                  vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    fields.update(config_overrides)
    config = config_class(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # generate() reads these, not the model config
        setattr(model.generation_config, name, getattr(config, name))
    return model


def _resolve_dtype(dtype) -> torch.dtype | str:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return "auto" if dtype is None else dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise UsageError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")


def _model_directory(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise UsageError(f"model directory {str(path)!r} does not exist or is not a directory")
    if not (directory / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    return directory


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | str | None = None):
    """Load a causal LM and its tokenizer from a local directory in Hugging Face format, or a GGUF file, offline.

    Args:
        path: a directory with config.json, weights and tokenizer files (as written by `save_pretrained`), or a
            .gguf file (dequantised by transformers; `fetch.load_gguf`).
        dtype: None or "auto" keeps the saved dtype; otherwise a torch.dtype or "float32" | "bfloat16" | "float16".

    Returns:
        (model, tokenizer): the model is in eval mode, as transformers returns it.

    Raises:
        UsageError: the directory is missing, is not a model directory, or cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    from advantage.lm.fetch import is_gguf, load_gguf

    torch_dtype = _resolve_dtype(dtype)
    if is_gguf(path):
        with quiet_transformers():
            return load_gguf(path, torch_dtype)
    directory = _model_directory(path)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UsageError(f"cannot load a causal LM from {str(path)!r}: {_one_line(error)}") from None
    return model, load_tokenizer(directory)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _permissions_from_umask(directory: Path) -> None:
    """Give `directory` and its files the permissions a plain mkdir/open would (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `directory` to write into; on success it replaces `directory` by renames.

    A directory under the final name is always complete: a crash leaves only ".<name>.tmp-*" siblings (and, in the
    instant between the two renames of an overwrite, a complete ".<name>.old-*" one).
    """
    final = Path(directory).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield temporary
        _permissions_from_umask(temporary)
        _fsync_directory(temporary)
        if final.exists():
            previous = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, previous)  # renaming onto an empty directory replaces it
            os.replace(temporary, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, final)
        _fsync_directory(final.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def save_pretrained(model, tokenizer, directory: str | os.PathLike) -> Path:
    """Write `model` (safetensors) and `tokenizer` (may be None) in Hugging Face format, atomically.

    Returns:
        The directory, which `load_causal_lm` and `transformers.AutoModelForCausalLM.from_pretrained` both read.
    """
    with _atomic_directory(directory) as temporary, quiet_transformers():
        model.save_pretrained(str(temporary))  # transformers 5.x always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(str(temporary))
    return Path(directory)


def save_builtin(size: str, directory: str | os.PathLike, architecture: str = "qwen2", seed: int = 0) -> Path:
    """Write a built-in model (random weights, `build_model`) with the character tokenizer as a Hugging Face
    directory: a stand-in for your own model when trying the commands offline.

        python -c "from advantage.lm.models import save_builtin; save_builtin('tiny', 'my-model')"
    """
    from advantage.lm.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    return save_pretrained(build_model(size, architecture, tokenizer, seed=seed), tokenizer, directory)


class ScalarHeadModel(nn.Module):
    """A transformer body with a linear head giving one scalar per token: the reward model and the value model.

    Args:
        body: a transformers base model (e.g. `Qwen2Model`, the `.base_model` of a causal LM) whose output has
            `.last_hidden_state` of shape (B, T, hidden).
        seed: seeds the head's initial weights, N(0, 1 / (hidden + 1)) with zero bias (the reward-head
            initialisation of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").
    """

    def __init__(self, body: nn.Module, seed: int = 0):
        super().__init__()
        self.body = body
        hidden = body.config.hidden_size
        parameter = next(body.parameters())
        # Drawn on the CPU, then moved: the same seed gives the same head whatever device the body is on (a draw on
        # a GPU would use, and re-seed, that device's generator).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = nn.Linear(hidden, 1, dtype=parameter.dtype)
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        self.head = head.to(parameter.device)

    @classmethod
    def from_causal_lm(cls, causal_lm, seed: int = 0, share_body: bool = False) -> ScalarHeadModel:
        """A scalar head on the body of a causal LM (its `.base_model`, without the language-model head).

        With `share_body=False` (default) the body is a copy, so training it leaves `causal_lm` unchanged.
        """
        body = causal_lm.base_model if share_body else copy.deepcopy(causal_lm.base_model)
        return cls(body, seed=seed)

    @property
    def config(self):
        """The body's transformers config."""
        return self.body.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """One scalar per token.

        Args:
            input_ids: (B, T) long.
            attention_mask: (B, T), 1 for real tokens; None means no padding.
            position_ids: (B, T); default derived from the attention mask (so left padding changes nothing).

        Returns:
            (B, T) in the body's dtype; entries at padded positions are meaningless (mask them).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state  # (B, T, hidden)
        return self.head(hidden).squeeze(-1)  # (B, T)

    def score_last_token(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """One scalar per sequence, read at its last real token (the reward model's score).

        Args:
            input_ids: (B, T) long; left or right padded.
            attention_mask: (B, T), 1 for real tokens.

        Returns:
            (B,) scalars.
        """
        scalars = self.forward(input_ids, attention_mask)  # (B, T)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.bool() * columns).argmax(dim=-1)  # (B,): largest real column, either padding side
        return scalars.gather(1, last.unsqueeze(1)).squeeze(1)

    def score_answers(self, batch: SharedPromptBatch) -> Tensor:
        """`score_last_token` of every prompt + answer sequence, with each prompt run through the body once.

        Args:
            batch: B prompts with K answers each, packed (`logprobs.collate_shared_prompt`).

        Returns:
            (B * K,) scalars, read at each answer's last token (at the prompt's last token for an empty answer,
            as `score_last_token` does for a prompt alone).
        """
        hidden = shared_prompt_forward(self.body, batch).last_hidden_state  # (B, W, hidden)
        rows = batch.rows
        lengths = batch.answer_mask.sum(dim=-1)  # (B * K,)
        answer_end = batch.answer_columns.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        last = torch.where(lengths > 0, answer_end, batch.prompt_lengths[rows] - 1)  # (B * K,) columns
        return self.head(hidden[rows, last]).squeeze(-1)

    def answer_values(self, batch: SharedPromptBatch) -> Tensor:
        """V(s_t) for every answer token t: the scalar of the state that chooses token t (the MDP of docs/math.md §5).

        The state before answer token t is the prefix up to the previous token, so its value is read at the column
        whose output predicts token t (`batch.predictor_columns`): the prompt's last token for t = 0.

        Returns:
            (B * K, A) in the head's dtype, 0 at padding.
        """
        hidden = shared_prompt_forward(self.body, batch).last_hidden_state  # (B, W, hidden)
        states = hidden[batch.rows.unsqueeze(1), batch.predictor_columns]  # (B * K, A, hidden)
        return self.head(states).squeeze(-1).masked_fill(~batch.answer_mask, 0.0)

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> Path:
        """Write the body in Hugging Face format, the head beside it, and optionally a tokenizer, atomically.

        Layout: config.json + model.safetensors (the body), scalar_head.safetensors ("weight" (1, hidden),
        "bias" (1,)), scalar_head.json, tokenizer files.
        """
        with _atomic_directory(directory) as temporary, quiet_transformers():
            self.body.save_pretrained(str(temporary))
            head = {name: tensor.detach().contiguous().cpu() for name, tensor in self.head.state_dict().items()}
            save_file(head, str(temporary / SCALAR_HEAD_WEIGHTS))
            description = {"format": "advantage.ScalarHeadModel", "version": 1,
                           "hidden_size": self.config.hidden_size}
            (temporary / SCALAR_HEAD_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(temporary))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype | str | None = None) -> ScalarHeadModel:
        """Load a model written by `save_pretrained`, offline, in eval mode.

        Args:
            dtype: as in `load_causal_lm`; the head follows the body's dtype.

        Raises:
            UsageError: missing directory, no scalar head in it, or unreadable files.
        """
        from transformers import AutoModel

        path = _model_directory(directory)
        if not (path / SCALAR_HEAD_WEIGHTS).is_file() or not (path / SCALAR_HEAD_CONFIG).is_file():
            raise UsageError(f"{str(directory)!r} has no scalar head ({SCALAR_HEAD_WEIGHTS}, {SCALAR_HEAD_CONFIG})")
        try:
            with quiet_transformers():
                body = AutoModel.from_pretrained(str(path), dtype=_resolve_dtype(dtype), local_files_only=True)
            head = load_file(str(path / SCALAR_HEAD_WEIGHTS))
            description = json.loads((path / SCALAR_HEAD_CONFIG).read_text())
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise UsageError(f"cannot load a scalar-head model from {str(directory)!r}: {_one_line(error)}") from None
        if description.get("hidden_size") != body.config.hidden_size:
            raise UsageError(f"{str(directory)!r}: scalar head expects hidden size {description.get('hidden_size')}, "
                             f"body has {body.config.hidden_size}")
        model = cls(body)
        model.head.load_state_dict({name: tensor.to(model.head.weight.dtype) for name, tensor in head.items()})
        return model.eval()


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (dropout off) inside the block, and back in the mode it was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s parameters: where its batches go."""
    return next(model.parameters()).device
