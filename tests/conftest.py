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


# The two readers of the quick demo: they must share one worker, so that the demo runs once per session.
QUICK_DEMO_READERS = ("test_demo.py", "test_readme.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group the tests for pytest-xdist's `--dist loadgroup` (scripts/test.sh): each test file on one worker, as
    `--dist loadfile` would, except that the quick demo's two readers form one group. xdist sends the group with
    the most tests first, so this long one starts at once instead of last."""
    for item in items:
        group = "quick-demo" if item.path.name in QUICK_DEMO_READERS else str(item.path.relative_to(ROOT))
        item.add_marker(pytest.mark.xdist_group(group))
