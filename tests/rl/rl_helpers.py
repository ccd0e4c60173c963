"""Helpers for the classic-RL tests."""

import json
import statistics
from pathlib import Path


def episodes(run_dir):
    """The episodes.jsonl rows of a run."""
    return [json.loads(line) for line in (Path(run_dir) / "episodes.jsonl").read_text().splitlines()]


def last_mean_return(run_dir, window=20):
    """Mean return of the last `window` finished training episodes."""
    rows = episodes(run_dir)
    assert len(rows) >= window, f"only {len(rows)} episodes"
    return statistics.fmean(row["return"] for row in rows[-window:])


def first_mean_return(run_dir, window=20):
    """Mean return of the first `window` finished training episodes."""
    rows = episodes(run_dir)
    return statistics.fmean(row["return"] for row in rows[:window])
