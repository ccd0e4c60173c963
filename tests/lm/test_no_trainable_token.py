"""Issue 13, item 8: a prompt that fills the context leaves nothing to train on; sft, reward and dpo say so.

Examples with no completion token left (or, for preferences, answers cut to no token) are left out with a warning
that counts them; when none is left the run stops with one line naming the first row, exit 2, nothing written.
"""

import json

import pytest

from advantage import cli

LONG = "1234567890" * 3 + "+1="  # 33 characters: fills a 16-token context on its own


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(stage, prompt):
    if stage == "sft":
        return {"prompt": prompt, "completion": "7\n"}
    return {"prompt": prompt, "chosen": "7\n", "rejected": "8\n"}


STAGE_FLAGS = {"sft": [], "reward": [], "dpo": []}
COMMON = ["--model", "builtin:nano", "--max-length", "16", "--batch-size", "2", "--max-steps", "1", "--progress",
          "false"]


@pytest.mark.parametrize("stage", sorted(STAGE_FLAGS))
def test_nothing_trainable_is_refused_in_one_line_naming_the_row(stage, tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [_rows(stage, LONG), _rows(stage, LONG)])
    out = tmp_path / "run"
    assert cli.main([stage, *COMMON, "--data", str(data), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{data}:1: the prompt fills all max_length=16 tokens" in error[-1], error
    assert not out.exists()


@pytest.mark.parametrize("stage", sorted(STAGE_FLAGS))
def test_examples_without_a_trainable_token_are_left_out_and_counted(stage, tmp_path, capsys):
    rows = [_rows(stage, "1+6="), _rows(stage, LONG), _rows(stage, "2+5="), _rows(stage, LONG)]
    data = _write(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    assert cli.main([stage, *COMMON, "--data", str(data), "--out", str(out)]) == 0
    error = capsys.readouterr().err
    kind = "examples" if stage == "sft" else "rows"
    assert (f"2 of 4 training {kind} have no token left to train on once cut to max_length=16 (the prompt fills "
            f"it; the first: {data}:2) and are left out") in error, error
    assert (out / "final").is_dir()
