"""--out that cannot become a run directory (issue 13, item 4): one line naming it, exit 2, nothing written."""

import os

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
