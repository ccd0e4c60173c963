"""Checkpoints that survive SIGKILL at any moment: written to a temporary directory, then renamed into place.

Layout: RUN_DIR/checkpoints/step_000012345/
    model.safetensors   every tensor of the modules (policy, critic, ...), keys "<module>.<parameter>"
    state.pt            optimiser states, RNG states, normalisation statistics, counters: loaded with
                        torch.load(weights_only=True), so loading never unpickles arbitrary objects
A directory that exists under its final name is complete; half-written ones only ever exist as ".tmp-*".
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from advantage.errors import UsageError
from advantage.run.files import atomic_path, usual_permissions

CHECKPOINTS = "checkpoints"


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_run_directory(run_dir: str | os.PathLike) -> None:
    """Refuse, in one line, an --out that cannot become a run directory: a file, a path through a file, or a place
    this process may not write (checked before anything is written, so nothing is left behind).

    Raises:
        UsageError: naming --out and the path at fault.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out '{run_dir}' is a file, not a directory; choose another --out")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out '{run_dir}': '{existing}' is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{run_dir}': '{existing}' is not writable by this user")


@contextlib.contextmanager
def removed_if_it_fails(run_dir: str | os.PathLike) -> Iterator[None]:
    """Run a fresh run's training inside this: if it raises before its first checkpoint, what it wrote is removed.

    A run that fails (a reward function that raises, data that turns out bad at step 3, ...) before any checkpoint
    has nothing to resume from, yet its config.yaml would make the fixed command refuse the same --out. So every
    entry the run created in `run_dir` is deleted, and `run_dir` itself if the run made it; entries that were there
    before are kept. Once a checkpoint exists the directory stays, and `--resume` continues it. Only an Exception
    triggers this (Ctrl-C keeps the partial logs to look at); under torchrun only rank 0 deletes.
    """
    run_dir = Path(run_dir)
    existed = run_dir.is_dir()
    before = set(os.listdir(run_dir)) if existed else set()
    try:
        yield
    except Exception:
        if int(os.environ.get("RANK", "0")) == 0 and run_dir.is_dir() and not list_checkpoints(run_dir):
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for name in set(os.listdir(run_dir)) - before:
                    entry = run_dir / name
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module],
                    state: dict[str, Any], keep: int = 3) -> Path:
    """Write a checkpoint for `step` atomically and keep only the newest `keep` checkpoints.

    Args:
        modules: name -> module; their state_dicts go to model.safetensors.
        state: anything torch.load(weights_only=True) can read back (tensors, numbers, strings, lists, dicts).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:012d}"
    temporary = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        # On the CPU, so that a checkpoint written on a GPU loads anywhere.
        tensors = {f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
                   for name, module in modules.items() for key, value in module.state_dict().items()}
        save_file(tensors, str(temporary / "model.safetensors"))
        with (temporary / "state.pt").open("wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        _fsync_dir(temporary)
        usual_permissions(temporary, directory=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a checkpoint's model.safetensors ("module.key" -> CPU tensor) and its saved state mapping."""
    path = Path(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
        # Tensors saved on a GPU come back on the CPU; load_state_dict puts them where the parameters are.
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as error:
        raise UsageError(f"{path}: unreadable checkpoint ({error})") from None
    return tensors, state


def load_checkpoint(path: str | os.PathLike, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Load weights into `modules` (strictly) and return the saved state mapping."""
    tensors, state = read_checkpoint(path)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return state


def save_weights(directory: str | os.PathLike, modules: dict[str, torch.nn.Module],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write modules' weights to DIRECTORY/model.safetensors atomically (the `final/` policy)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return directory / "model.safetensors"


def load_weights(directory: str | os.PathLike, modules: dict[str, torch.nn.Module]) -> None:
    """Load DIRECTORY/model.safetensors into modules (strictly)."""
    path = Path(directory) / "model.safetensors"
    if not path.exists():
        raise UsageError(f"{path}: no saved weights")
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)


def interval(every: int, steps: int) -> int:
    """`every`, or about a tenth of the run when it is 0 (checkpoints and evaluations)."""
    return every or max(1, math.ceil(steps / 10))
