"""PPO learns, writes the run-directory contract, and resumes exactly after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from rl_helpers import first_mean_return, last_mean_return
from safetensors.torch import load_file

from advantage.rl import ppo
from advantage.rl.presets import preset_for
from advantage.run.config import apply_overrides


def cartpole_preset(**changes):
    config = apply_overrides(ppo.PPOConfig(), preset_for("ppo", "CartPole-v1"), "preset")
    return apply_overrides(config, {"progress": False, **changes}, "test")


@pytest.mark.learning
def test_ppo_clip_learns_cartpole(tmp_path):
    run = ppo.train(cartpole_preset(total_steps=45_000, seed=1), tmp_path / "run")
    assert first_mean_return(run.run_dir) < 60
    assert last_mean_return(run.run_dir) >= 450


@pytest.mark.learning
def test_ppo_adaptive_kl_learns_cartpole(tmp_path):
    config = cartpole_preset(total_steps=60_000, seed=2, variant="kl_penalty", target_kl=0.01, beta=1.0,
                             anneal_clip=False)
    run = ppo.train(config, tmp_path / "run")
    assert last_mean_return(run.run_dir) >= 300
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    betas = {row["kl/beta"] for row in rows}
    assert len(betas) > 3  # the 1.5x rule moved beta


@pytest.mark.learning
def test_ppo_learns_pendulum(tmp_path):
    """A continuous (Box) task: the diagonal-Gaussian policy improves Pendulum-v1 well beyond random (~ -1200).
    60k steps (measured: -304 on this seed, -404 on seed 1) instead of the preset's 100k, to keep CI short."""
    config = apply_overrides(ppo.PPOConfig(), preset_for("ppo", "Pendulum-v1"), "preset")
    config = apply_overrides(config, {"env_id": "Pendulum-v1", "total_steps": 60_000, "progress": False,
                                      "seed": 3}, "test")
    run = ppo.train(config, tmp_path / "run")
    assert last_mean_return(run.run_dir) > -700


def test_run_directory_contract(tmp_path):
    run = ppo.train(cartpole_preset(total_steps=4096, checkpoint_every=4), tmp_path / "run")
    root = run.run_dir
    assert (root / "config.yaml").read_text().startswith("algorithm: ppo")
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in row and "time_s" in row for row in metrics)
    assert [row["step"] for row in metrics] == sorted(row["step"] for row in metrics)
    assert any("episode_return" in row for row in metrics)
    for key in ("losses/policy", "losses/value", "losses/entropy", "policy/approx_kl", "policy/clip_fraction",
                "value/explained_variance", "losses/grad_norm", "charts/sps"):
        assert key in metrics[-1]
    episodes = [json.loads(line) for line in (root / "episodes.jsonl").read_text().splitlines()]
    assert episodes and set(episodes[0]) == {"step", "time_s", "return", "length"}
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted((root / "checkpoints").iterdir())
    assert checkpoints and all((c / "model.safetensors").exists() and (c / "state.pt").exists() for c in checkpoints)
    weights = load_file(str(root / "final" / "model.safetensors"))
    assert any(key.startswith("policy.") for key in weights) and any(key.startswith("critic.") for key in weights)


def test_same_seed_same_result(tmp_path):
    a = ppo.train(cartpole_preset(total_steps=2048, seed=5), tmp_path / "a")
    b = ppo.train(cartpole_preset(total_steps=2048, seed=5), tmp_path / "b")
    for key, value in load_file(str(a.run_dir / "final" / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(b.run_dir / "final" / "model.safetensors"))[key]), key


def _cli(*args):
    return [sys.executable, "-m", "advantage.cli", "train", "ppo", *args]


@pytest.mark.parametrize("variant", ["clip", "kl_penalty"])
def test_resume_after_sigkill_is_exact(tmp_path, variant):
    common = ["--env-id", "CartPole-v1", "--total-steps", "12288", "--num-envs", "4", "--num-steps", "128",
              "--checkpoint-every", "2", "--seed", "7", "--progress", "false", "--tensorboard", "false",
              "--variant", variant, "--target-kl", "0.01", "--no-preset"]
    reference = subprocess.run(_cli(*common, "--out", str(tmp_path / "reference")), capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(_cli(*common, "--out", str(killed_dir)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        checkpoints = [p for p in (killed_dir / "checkpoints").glob("step_*")] if killed_dir.exists() else []
        if checkpoints:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"

    resumed = subprocess.run([sys.executable, "-m", "advantage.cli", "train", "ppo", "--resume", str(killed_dir)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    expected = load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))
    actual = load_file(str(killed_dir / "final" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # The logs are continuous: no step is written twice, and they end where the reference's end.
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    reference_steps = [json.loads(line)["step"] for line in
                       (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert steps == reference_steps
