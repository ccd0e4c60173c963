"""Files the run directory writes: atomic, and with the permissions a plain open() would give."""

import os
import stat

import pytest
import torch
from torch import nn

from advantage.run.checkpoint import removed_if_it_fails, save_checkpoint, save_weights
from advantage.run.files import atomic_path, atomic_write_text


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


def _fail_after(run_dir, write_checkpoint):
    with pytest.raises(RuntimeError, match="step 3"):
        with removed_if_it_fails(run_dir):
            run_dir.mkdir(exist_ok=True)
            (run_dir / "config.yaml").write_text("a: 1\n")
            (run_dir / "tensorboard").mkdir()
            if write_checkpoint:
                save_checkpoint(run_dir, 2, {"net": nn.Linear(2, 1)}, {"step": 2})
            raise RuntimeError("bad data at step 3")


def test_a_run_that_fails_before_a_checkpoint_removes_what_it_wrote_and_only_that(tmp_path):
    _fail_after(tmp_path / "fresh", write_checkpoint=False)
    assert not (tmp_path / "fresh").exists()  # made by the run: gone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    _fail_after(mine, write_checkpoint=False)
    assert sorted(os.listdir(mine)) == ["notes.txt"]  # there before: kept, with what was in it
    _fail_after(tmp_path / "resumable", write_checkpoint=True)
    assert sorted(os.listdir(tmp_path / "resumable")) == ["checkpoints", "config.yaml", "tensorboard"]
    with removed_if_it_fails(tmp_path / "done"):  # a run that succeeds keeps everything
        (tmp_path / "done").mkdir()
    assert (tmp_path / "done").is_dir()


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the new")
            raise OSError("disk full")
    assert target.read_text() == "old\n" and sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]
    with atomic_path(target, suffix=".tmp.png") as temporary:
        assert temporary.name.endswith(".tmp.png") and temporary.parent == tmp_path
        temporary.write_text("new\n")
    assert target.read_text() == "new\n" and sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]
