"""metrics.jsonl, episodes.jsonl and TensorBoard: one writer for every algorithm.

Every metrics line is a JSON object with at least `step` (environment steps so far) and `time_s` (wall seconds
since the start of the run, carried across resumes); `episode_return` is the mean return of the episodes finished
since the previous line, present whenever any finished. Every episodes line has `step`, `time_s`, `return`,
`length`. Metric names follow one vocabulary for every algorithm and stage: the table in docs/metrics.md
(tests/test_metric_names.py checks it against what each one logs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from advantage.run.files import atomic_write_text


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null says "not a number" without breaking parsers
    return value


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only the lines whose `step` <= max_step (used on resume, so no line is written twice)."""
    if not path.exists():
        return
    kept = []
    with path.open(encoding="utf-8") as stream:
        for line in stream:
            try:
                if json.loads(line)["step"] <= max_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line from a killed run: drop it and everything after
    atomic_write_text(path, "".join(kept))


class MetricsWriter:
    """Appends metrics and episodes as JSON lines and mirrors scalars to TensorBoard.

    Args:
        run_dir: the run directory.
        resume_step: when resuming, lines after this step (written after the checkpoint) are dropped first.
        tensorboard: write TensorBoard event files under RUN_DIR/tensorboard.
        episodes: keep episodes.jsonl (the classic algorithms); language-model stages have no episodes.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True,
                 episodes: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.episodes_path = self.run_dir / "episodes.jsonl"
        if resume_step is not None:
            truncate_jsonl(self.metrics_path, resume_step)
            if episodes:
                truncate_jsonl(self.episodes_path, resume_step)
        self._metrics = self.metrics_path.open("a", encoding="utf-8")
        self._episodes = self.episodes_path.open("a", encoding="utf-8") if episodes else None
        self._pending_returns: list[float] = []
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step)

    def episode(self, step: int, time_s: float, episode_return: float, length: int) -> None:
        """Record one finished episode."""
        assert self._episodes is not None, "this writer keeps no episodes"
        record = {"step": int(step), "time_s": round(float(time_s), 4), "return": float(episode_return),
                  "length": int(length)}
        self._episodes.write(json.dumps(record) + "\n")
        self._pending_returns.append(float(episode_return))
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("charts/episode_return", episode_return, step)
            self._tensorboard.add_scalar("charts/episode_length", length, step)

    def log(self, step: int, time_s: float, values: dict[str, Any]) -> dict[str, Any]:
        """Write one metrics line; adds `episode_return` if episodes finished since the last line. Returns it."""
        record: dict[str, Any] = {"step": int(step), "time_s": round(float(time_s), 4)}
        if self._pending_returns:
            record["episode_return"] = sum(self._pending_returns) / len(self._pending_returns)
            record["episodes"] = len(self._pending_returns)
            self._pending_returns = []
        for key, value in values.items():
            record[key] = _clean(value)
        self._metrics.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key if "/" in key else f"charts/{key}", value, step)
        return record

    def flush(self) -> None:
        """Push everything written so far to disk (called at checkpoints)."""
        for stream in (self._metrics, self._episodes):
            if stream is not None:
                stream.flush()
                os.fsync(stream.fileno())
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close every file."""
        self.flush()
        self._metrics.close()
        if self._episodes is not None:
            self._episodes.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete JSON lines of a file (a torn last line is ignored)."""
    rows = []
    with Path(path).open(encoding="utf-8") as stream:
        for line in stream:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
