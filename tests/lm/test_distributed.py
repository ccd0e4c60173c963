"""Data parallelism over torch.distributed: `torchrun --nproc-per-node 2 -m advantage.cli STAGE ...` (gloo, CPU) ends
with the parameters of one process with the same global batch, and writes the run directory once."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from advantage import cli
from advantage.lm.data_order import DataOrder
from advantage.run.processes import Processes

pytestmark = pytest.mark.distributed  # torchrun, two processes

COMMON = ["--model", "builtin:nano", "--task", "arithmetic", "--task-max-operand", "9", "--task-train-size", "32",
          "--task-eval-size", "8", "--batch-size", "8", "--max-steps", "4", "--learning-rate", "1e-3",
          "--progress", "false", "--tensorboard", "false", "--threads", "1"]
STAGES = {"sft": [], "reward": ["--loss", "bt"], "dpo": ["--beta", "0.1"]}


def run(command, processes):
    """Run `advantage STAGE ...` in 1 process, or in `processes` processes under torchrun (gloo on CPU)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    environment.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "advantage.cli", *command], env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def final_weights(run_dir):
    names = ["model.safetensors"] if (run_dir / "final" / "model.safetensors").exists() else []
    assert names, list((run_dir / "final").iterdir())
    weights = load_file(str(run_dir / "final" / names[0]))
    head = run_dir / "final" / "scalar_head.safetensors"
    if head.exists():
        weights.update({f"head.{name}": tensor for name, tensor in load_file(str(head)).items()})
    return weights


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_end_with_the_parameters_of_one(tmp_path, stage):
    """2 processes x 4 examples each = 1 process x 8: the same weights after 4 AdamW steps (up to float rounding: the
    micro-batches differ), the same logged losses, and one metrics.jsonl written by rank 0 only."""
    command = [stage, *COMMON, *STAGES[stage]]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0  # one process: this one (1 thread, as torchrun's)
    run([*command, "--out", str(tmp_path / "two")], 2)
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [row["step"] for row in rows["two"]] == [row["step"] for row in rows["one"]]  # written once
    loss = {"sft": "losses/nll", "reward": "losses/reward", "dpo": "losses/dpo"}[stage]
    for single, double in zip(rows["one"], rows["two"]):
        if loss in single:
            assert abs(single[loss] - double[loss]) < 1e-4
            assert single["charts/tokens_per_s"] > 0 and double["charts/tokens_per_s"] > 0
        for key in single:
            if key.startswith("eval/"):  # rank 0 evaluated the whole held-out set
                assert abs(single[key] - double[key]) < 1e-4, key


def test_a_batch_that_does_not_split_over_the_processes_is_a_usage_error(tmp_path):
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "advantage.cli", "sft", *COMMON, "--batch-size", "6", "--gradient-accumulation-steps",
                           "2", "--out", str(tmp_path / "bad")], env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "field 'batch_size' must be a multiple of processes x gradient_accumulation_steps (2 x 2), got 6" \
        in done.stderr
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_data_order_shards_each_batch_and_one_process_touches_no_process_group():
    whole = DataOrder(20, 8, seed=3)
    shards = [DataOrder(20, 8, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for step in range(5):
        assert sorted(shards[0].batch(step) + shards[1].batch(step)) == sorted(whole.batch(step))
        assert shards[0].batch(step) == whole.batch(step)[0::2]
    single = Processes()
    assert (single.rank, single.world_size, single.is_main) == (0, 1, True)
    assert single.sum(2, 3.5) == [2.0, 3.5]
    assert not torch.distributed.is_initialized()
    local = torch.arange(6.0).view(3, 2)
    assert torch.equal(single.gather_rows(local, 3), local)


def test_grpo_under_torchrun_shares_the_prompts_and_writes_once(tmp_path):
    """GRPO with 2 processes: each samples the groups of its half of the prompts (so the completions, unlike the
    offline stages' batches, differ from one process's); the loss normalisation over processes is proven exact in
    tests/lm/test_grpo_stage.py. Here: it runs, logs every step once, and rank 0's final/ loads and differs from the
    start."""
    # A reward with a spread in every group (the random model's answers are all wrong): a gradient at every step.
    (tmp_path / "length.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    command = ["grpo", *COMMON, "--group-size", "4", "--max-new-tokens", "4", "--beta", "0.04",
               "--reward-functions", f"{tmp_path / 'length.py'}:length", "--out", str(tmp_path / "two")]
    run(command, 2)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(row["losses/grpo"]) for row in rows[1:])
    from advantage.lm.models import build_model

    start = build_model("nano", seed=1).state_dict()
    moved = final_weights(tmp_path / "two")
    assert any(not torch.equal(moved[name], start[name]) for name in moved if name in start)


def test_rlhf_under_torchrun_runs_and_writes_once(tmp_path):
    """RLHF-PPO with 2 processes (policy, reference and value model on each; gradients of both models summed)."""
    command = ["rlhf", *COMMON, "--samples-per-prompt", "2", "--max-new-tokens", "4", "--update-epochs", "2",
               "--num-minibatches", "2", "--out", str(tmp_path / "two")]
    run(command, 2)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(row["losses/policy"]) and math.isfinite(row["losses/value"]) for row in rows[1:])
    assert (tmp_path / "two" / "final" / "value_model" / "scalar_head.safetensors").exists()
