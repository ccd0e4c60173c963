"""`advantage report`: learning curves from run directories, as PNG.

Runs that share an algorithm and an environment (e.g. several seeds) are one group, drawn as the mean of their
curves with the min-max spread shaded; different groups are overlaid. A run's curve is the mean return of its
last `window` finished training episodes, against environment steps.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from advantage.errors import UsageError
from advantage.run.config import load_yaml_mapping
from advantage.run.metrics import read_jsonl


def learning_curve(run_dir: Path, window: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(steps, rolling mean return over the last `window` episodes) of one run."""
    path = run_dir / "episodes.jsonl"
    if not path.exists():
        raise UsageError(f"{run_dir}: no episodes.jsonl (not a run directory of a classic algorithm)")
    rows = read_jsonl(path)
    if not rows:
        raise UsageError(f"{path}: no finished episode yet")
    steps = np.array([row["step"] for row in rows], dtype=np.float64)
    returns = np.array([row["return"] for row in rows], dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(returns)])
    counts = np.minimum(np.arange(1, len(returns) + 1), window)
    rolling = (cumulative[1:] - cumulative[np.arange(1, len(returns) + 1) - counts]) / counts
    return steps, rolling


def group_label(run_dir: Path) -> str:
    """'ALGO ENV' from the run's config.yaml."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_yaml_mapping(config_path)
    return f"{config.get('algorithm', '?')} {config.get('env_id', '?')}"


def write_report(run_dirs: list[Path], out: Path, window: int = 20, title: str | None = None) -> Path:
    """Plot every run's curve (grouped, mean and spread) to the PNG `out`, atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for run_dir in run_dirs:
        groups[group_label(run_dir)].append(learning_curve(run_dir, window))
    figure, axis = plt.subplots(figsize=(8, 5), dpi=120)
    for label, curves in sorted(groups.items()):
        end = min(steps[-1] for steps, _ in curves)
        grid = np.linspace(0, end, 200)
        values = np.stack([np.interp(grid, steps, rolling) for steps, rolling in curves])
        mean = values.mean(axis=0)
        line, = axis.plot(grid, mean, label=f"{label} ({len(curves)} run{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            axis.fill_between(grid, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    axis.set_xlabel("environment steps")
    axis.set_ylabel(f"return (mean of the last {window} episodes)")
    axis.set_title(title or "learning curves (mean, min-max over runs)")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    os.replace(temporary, out)
    return out
