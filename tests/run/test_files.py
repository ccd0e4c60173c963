"""Files the run directory writes: atomic, and with the permissions a plain open() would give."""

import os
import stat

import torch
from torch import nn

from advantage.run.checkpoint import save_checkpoint, save_weights
from advantage.run.config import atomic_write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_checkpoints_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
        assert _mode(tmp_path / "config.yaml") == 0o644  # mkstemp alone would leave 0600
        weights = save_weights(tmp_path / "final", {"net": nn.Linear(2, 1)})
        assert _mode(weights) == 0o644
        checkpoint = save_checkpoint(tmp_path, 10, {"net": nn.Linear(2, 1)}, {"step": torch.tensor(10)})
        assert _mode(checkpoint) == 0o755
        assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
    finally:
        os.umask(mask)
