"""Defaults chosen by the action space (issue 16): Box actions without a preset get each algorithm's BOX_DEFAULTS;
the run says in one line where its values came from and marks each in config.yaml."""

import dataclasses

import pytest
import yaml

from advantage import cli
from advantage.rl import api
from advantage.rl.envs import action_space_kind
from advantage.run.config import read_sources, sources_of

BOX = "defaults for Box actions"


def test_the_action_space_kind_of_an_environment():
    assert action_space_kind("Pendulum-v1") == "Box"
    assert action_space_kind("CartPole-v1") == "Discrete"
    assert action_space_kind("NoSuchEnvironment-v0") is None


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "trpo", "reinforce"])
def test_box_actions_without_a_preset_take_the_box_defaults(algorithm):
    box = api.box_defaults(algorithm)
    assert box, f"{algorithm} has no defaults for Box actions"
    config = api.resolve_config(algorithm, {"env_id": "Pendulum-v1"}, use_preset=False)
    for field, value in box.items():
        assert getattr(config, field) == value, field
        assert sources_of(config)[field] == BOX
    # Every one of them differs from the discrete default (else it would not need listing).
    defaults = api.algorithm_module(algorithm).CONFIG()
    assert all(getattr(defaults, field) != value for field, value in box.items())


def test_discrete_actions_keep_the_class_defaults():
    config = api.resolve_config("ppo", {"env_id": "CartPole-v1"}, use_preset=False)
    assert config == dataclasses.replace(api.algorithm_module("ppo").CONFIG(), env_id="CartPole-v1")
    assert set(sources_of(config).values()) == {"arguments"}


def test_a_preset_is_applied_as_shipped_over_the_class_defaults_not_the_box_ones():
    # TRPO's Pendulum preset sets num_envs and num_steps but not update sizes it was tuned without; the Box
    # defaults must not slip under it.
    config = api.resolve_config("trpo", {"env_id": "Pendulum-v1"})
    assert (config.num_envs, config.num_steps) == (4, 256)
    assert BOX not in sources_of(config).values()
    assert sources_of(config)["num_envs"] == "preset trpo/Pendulum-v1"


def test_flags_and_config_files_win_over_the_box_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("num_steps: 512\n")
    config = api.resolve_config("ppo", {"env_id": "Pendulum-v1", "num_envs": 3}, path, use_preset=False,
                                source="command line")
    assert (config.num_envs, config.num_steps, config.update_epochs) == (3, 512, 10)
    sources = sources_of(config)
    assert (sources["num_envs"], sources["num_steps"], sources["update_epochs"]) == ("command line", str(path), BOX)


def test_the_run_prints_its_sources_in_one_line_and_marks_them_in_config_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "ppo", "--env-id", "Pendulum-v1", "--no-preset", "--total-steps", "64",
                     "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1", "--out", str(out),
                     "--progress", "false", "--tensorboard", "false"]) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("advantage: ppo"))
    assert line.startswith("advantage: ppo Pendulum-v1: defaults for Box actions (num_envs=1, ")
    assert "command line (" in line and "num_steps=64" in line and line.endswith("the rest: ppo's defaults")
    # The flag moved num_steps out of the Box group.
    assert "num_steps=2048" not in line
    text = (out / "config.yaml").read_text()
    assert "num_envs: 1  # from defaults for Box actions" in text
    assert "num_steps: 64  # from command line" in text
    assert "gamma: 0.99\n" in text  # a field at its default carries no comment
    saved = yaml.safe_load(text)
    assert saved["learning_rate"] == 3e-4 and saved["normalize_reward"] is True
    assert read_sources(out / "config.yaml")["learning_rate"] == BOX

    # A resumed run keeps the sources its start wrote, and adds the new flags'.
    assert cli.main(["train", "ppo", "--resume", str(out), "--total-steps", "128"]) == 0
    sources = read_sources(out / "config.yaml")
    assert sources["learning_rate"] == BOX and sources["total_steps"] == "arguments"


def test_help_shows_the_box_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "ppo", "--help"])
    assert "[default: 128; Box actions: 2048]" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "no shipped preset: its defaults for Box actions" in " ".join(capsys.readouterr().out.split())
