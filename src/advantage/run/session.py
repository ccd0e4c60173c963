"""The run contract both halves share: one training run's directory, fresh or resumed.

`RunSession` holds what every run does the same way, classic or language model: it refuses to overwrite another
run, finds the newest checkpoint to resume from, writes config.yaml, opens metrics.jsonl / TensorBoard and the
progress display (on the process that writes, rank 0), keeps the wall clock across resumes, counts and stops
non-finite losses, and asks `Processes` which process it is (the one place the device and the process group are
decided). `rl.common.Session` adds environments and iterations, `lm.session.LMSession` a model and optimizer steps.
Every `train` returns a `Run`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advantage.errors import NonFiniteLossError, UsageError
from advantage.run.checkpoint import check_run_directory, list_checkpoints
from advantage.run.config import save_config
from advantage.run.metrics import MetricsWriter
from advantage.run.processes import Processes
from advantage.run.progress import Progress


@dataclass
class Run:
    """What `train` returns, in both halves: where the run is, its last metrics line, and for a language model the
    trained model (as saved in final/) and its tokenizer."""

    run_dir: Path
    algorithm: str
    config: Any
    last_metrics: dict[str, Any]
    steps: int
    model: Any = None
    tokenizer: Any = None


def default_run_dir(algorithm: str, subject: str, seed: int) -> Path:
    """runs/ALGORITHM-SUBJECT-seedS, SUBJECT the environment id (classic) or the model's name (language models)."""
    return Path("runs") / f"{algorithm}-{subject}-seed{seed}"


class RunSession:
    """One run's directory, fresh or resumed (see the module docstring); subclassed by each half.

    Constructing it only checks the directory: nothing is written until `write_config`, so a run stopped by bad
    input before it starts leaves no half-made run directory behind.

    Args:
        algorithm: the name written to config.yaml ("ppo", "sft", ...).
        config: the resolved config; it has `tensorboard`, `progress`, `max_nonfinite` and `keep_checkpoints`.
        run_dir: where to write.
        resume: continue from the newest checkpoint in run_dir (the directory must hold a run).
    """

    unit = "updates"  # what a non-finite loss skips, in the error that stops the run
    advice = "lower the learning rate"
    auto_device: str | None = None  # what `--device auto` means; None: CUDA when present, else the CPU

    def __init__(self, algorithm: str, config: Any, run_dir: str | Path, resume: bool):
        self.algorithm, self.config, self.run_dir, self.resume = algorithm, config, Path(run_dir), resume
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
        requested = str(getattr(config, "device", "cpu"))
        if requested.strip().lower() == "auto" and self.auto_device is not None:
            requested = self.auto_device
        self.processes = Processes(requested)
        self.start_step = 0
        self.elapsed_before = 0.0
        self.consecutive_nonfinite = 0
        self.skipped_updates = 0
        self.metrics: MetricsWriter | _Unwritten | None = None
        self.progress: Progress | None = None
        self._clock_start = time.perf_counter()

    def write_config(self) -> None:
        """Create the run directory and write config.yaml (rank 0), each value marked with where it came from."""
        if self.processes.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml", self.algorithm)

    def restore_common(self, state: dict[str, Any]) -> None:
        """Take back what `common_state` saved: the clock, the step and the skipped updates."""
        self.start_step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])
        self.skipped_updates = int(state.get("skipped_updates", 0))

    def common_state(self, step: int) -> dict[str, Any]:
        """The entries every checkpoint holds: the step, the wall clock so far, the skipped updates."""
        return {"step": step, "elapsed_s": self.elapsed(), "skipped_updates": self.skipped_updates}

    def open_writers(self, total: int, description: str, episodes: bool, resumed: bool) -> None:
        """Open metrics.jsonl and TensorBoard (rank 0; the other processes build the same lines and write nothing)
        and the progress display, then start the clock of this process.

        Args:
            total: where the progress display ends (environment steps or optimizer steps).
            episodes: also write episodes.jsonl (classic).
            resumed: continue the metrics after `start_step`, dropping lines a killed run wrote beyond it.
        """
        main = self.processes.is_main
        # Resumed from a checkpoint: the lines after it go (the killed run wrote them); resumed without one (killed
        # before its first checkpoint): the run starts over, and every old line goes.
        resume_step = (self.start_step if self.checkpoint_path is not None else -1) if resumed else None
        self.metrics = MetricsWriter(self.run_dir, resume_step=resume_step, tensorboard=self.config.tensorboard,
                                     episodes=episodes) if main else _Unwritten()
        self.progress = Progress(total, self.start_step, description, enabled=self.config.progress and main)
        self._clock_start = time.perf_counter()

    def elapsed(self) -> float:
        """Wall seconds since the start of the run, carried across resumes."""
        return self.elapsed_before + time.perf_counter() - self._clock_start

    def finite(self, loss: float | torch.Tensor) -> bool:
        """False (and counted) if the loss is NaN or infinite: the caller skips that update.

        Raises NonFiniteLossError after `max_nonfinite` consecutive ones; the last checkpoint stays intact.
        """
        if math.isfinite(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)):
            self.consecutive_nonfinite = 0
            return True
        self.consecutive_nonfinite += 1
        self.skipped_updates += 1
        if self.consecutive_nonfinite >= self.config.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive {self.unit} had a non-finite loss; stopped. The last "
                f"checkpoint in {self.run_dir / 'checkpoints'} is intact ({self.advice})")
        return False

    def close_writers(self, summary: str) -> None:
        """Close metrics and TensorBoard, and end the progress display with `summary`."""
        if self.metrics is not None:
            self.metrics.close()
        if self.progress is not None:
            self.progress.close(summary)


class _Unwritten:
    """The metrics writer of the processes other than rank 0: builds the same lines, writes nothing."""

    def log(self, step: int, time_s: float, values: dict[str, Any]) -> dict[str, Any]:
        return {"step": int(step), "time_s": round(float(time_s), 4), **values}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
