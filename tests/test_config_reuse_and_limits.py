"""Issue 13's smaller items: a run's own config.yaml works as --config, a --max-length beyond the model's positions
is refused, and a --total-steps below one rollout says that a whole rollout is trained."""

import pytest
import yaml

from advantage import cli

PPO = ["train", "ppo", "--env-id", "CartPole-v1", "--total-steps", "256", "--progress", "false"]
SFT = ["sft", "--model", "builtin:nano", "--task", "arithmetic", "--task-max-operand", "9", "--task-train-size", "8",
       "--task-eval-size", "2", "--max-steps", "1", "--batch-size", "2", "--progress", "false"]


@pytest.mark.parametrize("command, other", [(PPO, ["train", "a2c"]), (SFT, ["dpo"])], ids=["train", "sft"])
def test_a_runs_own_config_yaml_is_a_valid_config_for_its_algorithm_only(command, other, tmp_path, capsys):
    assert cli.main([*command, "--out", str(tmp_path / "first")]) == 0
    saved = tmp_path / "first" / "config.yaml"
    assert "algorithm:" in saved.read_text()
    assert cli.main([*command[:2 if command is PPO else 1], "--config", str(saved), "--out", str(tmp_path / "again"),
                     "--progress", "false"]) == 0
    # The same run once more: the same values (each now marked as coming from that file).
    again = (tmp_path / "again" / "config.yaml").read_text()
    assert yaml.safe_load(again) == yaml.safe_load(saved.read_text())
    assert f"  # from {saved}" in again
    capsys.readouterr()
    assert cli.main([*other, "--config", str(saved), "--out", str(tmp_path / "other")]) == 2
    name = "ppo" if command is PPO else "sft"
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"advantage: error: {saved}: this config is for '{name}', not '{other[-1]}'"], error


def test_a_max_length_beyond_the_models_positions_is_refused(tmp_path, capsys):
    assert cli.main([*SFT, "--max-length", "100000", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "field 'max_length' (100000) is beyond the" in error[0], error
    assert "positions of model 'builtin:nano'" in error[0] and not (tmp_path / "run").exists()


def test_total_steps_below_one_rollout_say_that_a_whole_rollout_is_trained(tmp_path, capsys):
    assert cli.main([*PPO, "--total-steps", "1", "--out", str(tmp_path / "run")]) == 0
    assert ("total_steps=1 is less than one rollout (256 steps); training one rollout, 256 steps"
            in capsys.readouterr().err)
    assert cli.main([*PPO, "--total-steps", "300", "--out", str(tmp_path / "more")]) == 0
    assert "less than one" not in capsys.readouterr().err
