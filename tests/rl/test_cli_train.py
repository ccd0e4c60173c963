"""`advantage train` and `advantage eval` from the command line: presets, config files, one-line errors."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from advantage import cli
from advantage.errors import NonFiniteLossError
from advantage.rl import ppo
from advantage.rl.common import Session


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "advantage.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_train_then_eval_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    trained = run("train", "ppo", "--env-id", "CartPole-v1", "--total-steps", "2048", "--out", str(out),
                  "--progress", "false")
    assert trained.returncode == 0, trained.stderr
    evaluated = run("eval", str(out), "--episodes", "3")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["episodes"] == 3 and result["mean_return"] > 0 and result["std_return"] >= 0


def test_eval_of_a_dqn_run_acts_greedily_on_q(tmp_path):
    out = tmp_path / "dqn"
    assert cli.main(["train", "dqn", "--env", "CartPole-v1", "--total-steps", "1500", "--hidden-sizes", "16",
                     "--gradient-steps", "4", "--out", str(out), "--progress", "false"]) == 0
    from advantage.rl.evaluate import evaluate_run

    greedy = evaluate_run(out, 2, seed=0)
    assert greedy["episodes"] == 2 and greedy["mean_return"] >= 8  # CartPole cannot end before 8 steps
    assert evaluate_run(out, 2, seed=0) == greedy  # deterministic


def test_preset_then_config_file_then_flags(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(ppo, "train", lambda config, out, resume=False: seen.update(config=config, out=out))
    config_file = tmp_path / "c.yaml"
    config_file.write_text("gamma: 0.97\nnum_steps: 64\n")
    assert cli.main(["train", "ppo", "--env-id", "CartPole-v1", "--config", str(config_file), "--num-steps", "16",
                     "--out", str(tmp_path / "x")]) == 0
    config = seen["config"]
    assert config.update_epochs == 20  # from the CartPole preset
    assert config.gamma == 0.97  # the file beats the preset (0.98)
    assert config.num_steps == 16  # the flag beats the file
    assert cli.main(["train", "ppo", "--env-id", "CartPole-v1", "--no-preset", "--out", str(tmp_path / "y")]) == 0
    assert seen["config"].update_epochs == 4
    # `--env` is the short spelling of `--env-id`; the Acrobot preset applies through it
    assert cli.main(["train", "ppo", "--env", "Acrobot-v1", "--out", str(tmp_path / "z")]) == 0
    assert seen["config"].env_id == "Acrobot-v1" and seen["config"].num_envs == 16


BAD = [
    (["train", "ppo", "--gamma", "1.5"], "gamma"),
    (["train", "ppo", "--clip-range", "-0.1"], "clip_range"),
    (["train", "ppo", "--num-steps", "0"], "num_steps"),
    (["train", "ppo", "--num-envs", "0"], "num_envs"),
    (["train", "ppo", "--gamma", "abc"], "gamma"),
    (["train", "ppo", "--variant", "nope"], "variant"),
    (["train", "ppo", "--env-id", "NoSuchEnv-v9"], "NoSuchEnv-v9"),
    (["train", "ppo", "--env-id", "Blackjack-v1"], "observation space"),
    (["train", "nosuchalgo"], "nosuchalgo"),
    (["train", "ppo", "--config", "/nonexistent/file.yaml"], "/nonexistent/file.yaml"),
    (["eval", "/nonexistent/run"], "/nonexistent/run"),
    (["train", "ppo", "--resume", "/nonexistent/run"], "/nonexistent/run"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_user_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    # In the test process (a subprocess each cost ~3 s of imports); the console script's own error path is
    # tested once in tests/test_cli.py. An uncaught exception (a traceback) would fail the test here too.
    monkeypatch.chdir(tmp_path)
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] == "train" and "--resume" not in argv else argv
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's errors (an unknown algorithm, a malformed number)
        code = exit_.code
    error = capsys.readouterr().err
    assert code == 2, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], error
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()  # nothing half-written


def test_bad_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gamma: 0.9\nnum_steps: [1,\n")
    assert cli.main(["train", "ppo", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert str(bad) in error and error.count("\n") == 0
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("gama: 0.9\n")
    assert cli.main(["train", "ppo", "--config", str(unknown), "--out", str(tmp_path / "p")]) == 2
    assert "gama" in capsys.readouterr().err


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "ppo", "--total-steps", "512", "--out", str(out), "--progress", "false"]) == 0
    before = (out / "final" / "model.safetensors").read_bytes()
    assert cli.main(["train", "ppo", "--total-steps", "512", "--out", str(out), "--progress", "false"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").read_bytes() == before


class NaNAfter(gym.Env):
    """CartPole-like env whose rewards become NaN after `clean_steps` steps."""

    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, clean_steps=600):
        self.clean_steps, self.t = clean_steps, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        reward = float("nan") if self.t > self.clean_steps else 1.0
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), reward, False, self.t % 50 == 0, {}


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, capsys):
    gym.register("NaNAfter-v0", entry_point=NaNAfter)
    out = tmp_path / "run"
    code = cli.main(["train", "ppo", "--env-id", "NaNAfter-v0", "--no-preset", "--num-envs", "1", "--num-steps",
                     "128", "--checkpoint-every", "1", "--total-steps", "4096", "--out", str(out), "--progress",
                     "false", "--vectorization", "sync"])
    assert code == 1
    started, *error = capsys.readouterr().err.strip().splitlines()
    assert started.startswith("advantage: ppo NaNAfter-v0: ")  # where the values came from
    assert len(error) == 1 and "non-finite" in error[0]
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert checkpoints, "the checkpoints before the NaNs must survive"
    assert not (out / "final").exists()


def test_session_counts_consecutive_non_finite_losses(tmp_path):
    import torch

    session = Session("ppo", ppo.PPOConfig(max_nonfinite=3), tmp_path / "s", False, 10, 1)
    assert session.finite(torch.tensor(1.0))
    assert not session.finite(torch.tensor(float("nan")))
    assert not session.finite(torch.tensor(float("inf")))
    assert session.finite(torch.tensor(0.0))  # a finite loss resets the streak
    assert not session.finite(torch.tensor(float("nan")))
    assert not session.finite(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError):
        session.finite(torch.tensor(float("nan")))
    assert session.skipped_updates == 5


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["verify"]] + [["train", a] for a in cli.ALGORITHMS])
def test_help_documents_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: advantage")
    if command == ["train", "ppo"]:
        for flag in ("--env-id", "--total-steps", "--seed", "--num-envs", "--config", "--out", "--resume",
                     "--gamma", "--gae-lambda", "--clip-range", "--variant", "--target-kl", "--learning-rate"):
            assert flag in out, flag


def test_python_api_is_as_short_as_the_cli(tmp_path):
    import advantage

    run = advantage.train("ppo", out=tmp_path / "r", total_steps=1024, progress=False, tensorboard=False)
    assert run.steps == 1024 and run.config.update_epochs == 20  # the CartPole preset applied
    assert (run.run_dir / "final" / "model.safetensors").exists()
    resumed = advantage.resume(tmp_path / "r", total_steps=2048)
    assert resumed.steps == 2048
    with pytest.raises(advantage.errors.UsageError):
        advantage.train("nope")
