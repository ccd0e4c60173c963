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


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's schedule (scripts/test.sh runs two workers): each test file on one worker, as `--dist loadfile`
    does, except that the quick demo's two readers form one unit. xdist sends the unit with the most tests first, so
    this long one starts at once instead of last. (xdist's own `--dist loadgroup` does not group under pytest 9:
    it renames `item._nodeid`, which pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FilesWithTheQuickDemoTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "quick-demo" if Path(path).name in QUICK_DEMO_READERS else path

    return FilesWithTheQuickDemoTogether(config, log)
