"""--out that cannot become a run directory (issue 13, item 4): one line naming it, exit 2, nothing written."""

import os
import shutil
import subprocess
import sys

import pytest

from advantage import cli

SMALL_LM = ["--model", "builtin:nano", "--task", "arithmetic", "--max-steps", "1", "--batch-size", "2",
            "--progress", "false"]
COMMANDS = {
    "sft": ["sft", *SMALL_LM],
    "grpo": ["grpo", *SMALL_LM, "--group-size", "2", "--max-new-tokens", "4"],
    "train": ["train", "ppo", "--env-id", "CartPole-v1", "--total-steps", "64", "--progress", "false"],
    "demo": ["demo", "--quick", "--progress", "false", "--no-real-model"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("under", [False, True], ids=["the-file", "under-the-file"])
def test_an_out_that_is_a_file_is_refused_in_one_line(command, under, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")
    out = existing / "run" if under else existing
    code = cli.main([*COMMANDS[command], "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    expected = "so no directory can be made under it" if under else "is a file, not a directory"
    assert lines[0].startswith("advantage: error: --out") and expected in lines[0], lines
    assert existing.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["notes.txt"]



ONLINE = {"grpo": COMMANDS["grpo"],
          "rlhf": ["rlhf", *SMALL_LM, "--samples-per-prompt", "2", "--max-new-tokens", "4"]}


@pytest.mark.parametrize("stage", sorted(ONLINE))
@pytest.mark.parametrize("body, needle", [("raise RuntimeError('the grader is down')", "the grader is down"),
                                          ("return [1.0]", "returned 1 values for")],
                         ids=["raises", "wrong-count"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_and_the_fixed_command_runs(stage, body, needle,
                                                                                                 tmp_path, capsys):
    """Issue 13, item 1: a reward function failing mid-run stops grpo or rlhf with its one line, and no
    config.yaml, metrics.jsonl or tensorboard/ stays behind to refuse the rerun of the fixed command on the same
    --out."""
    out, rewards = tmp_path / "run", tmp_path / "rf.py"
    rewards.write_text(f"def f(prompts, completions):\n    {body}\n")
    command = [*ONLINE[stage], "--reward-functions", f"{rewards}:f", "--tensorboard", "true", "--out", str(out)]
    code = cli.main(command)
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and needle in error[0], error
    assert not out.exists()
    rewards.write_text("def f(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    assert cli.main(command) == 0
    assert (out / "final").is_dir() and (out / "config.yaml").exists()


def _as_a_user_who_cannot_write(command):
    """`command` run so that file permissions bind: as it is for a normal user; for root, through setpriv with the
    capabilities that override them dropped (root would otherwise write anywhere)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    assert setpriv, "root without setpriv (util-linux) cannot drop CAP_DAC_OVERRIDE for this test"
    drop = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", drop, "--inh-caps", drop, *command]


@pytest.mark.parametrize("command", ["train", "sft"])
def test_an_out_in_a_directory_the_user_cannot_write_is_refused_in_one_line(command, tmp_path):
    """Issue 13, item 5: a real PermissionError, not a mocked one: the directory is read-only for its owner."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = [sys.executable, "-m", "advantage.cli", *COMMANDS[command], "--out", str(locked / "run")]
        done = subprocess.run(_as_a_user_who_cannot_write(argv), capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        locked.chmod(0o755)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == f"advantage: error: --out '{locked / 'run'}': '{locked}' is not writable by this user"
    assert os.listdir(locked) == []
