"""Shared test set-up: offline, deterministic, few threads (the CI machine has 2 cores)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`bash scripts/main.sh --quick` (the README's main command, with the quick budget) run once for the session:
    (its output directory, the completed process)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "main.sh"), "--quick", "--progress", "false", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    return out, done
