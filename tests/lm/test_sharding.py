"""Sharding with torch FSDP2 (`--sharding fsdp`, lm/sharding.py) under torchrun on the CPU (gloo): two processes end
with the parameters of one while each holds half of the parameters and of the optimizer state, and a checkpoint
resumes on another number of processes, sharded or not."""

import json

import pytest
import torch
from test_distributed import COMMON, final_weights, run

from advantage import cli

pytestmark = pytest.mark.distributed  # torchrun, two processes


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(one, two):
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_sharded_sft_is_one_process_with_half_the_memory_each_and_resumes_unsharded(tmp_path):
    """sft, every weight trained: 2 sharded processes for 2 steps, then the run resumed by one unsharded process for
    2 more, ends with the weights of one process for 4 steps; the sharded lines log the same losses and gradient
    norms, and each process held half the parameter and optimizer memory."""
    command = ["sft", *COMMON, "--lr-schedule", "constant"]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0  # 4 steps, one process (1 thread, as torchrun's)
    run([*command, "--max-steps", "2", "--sharding", "fsdp", "--out", str(tmp_path / "two")], 2)
    assert cli.main(["sft", "--resume", str(tmp_path / "two"), "--max-steps", "4", "--sharding", "none"]) == 0
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))

    single, sharded = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [row["step"] for row in sharded] == [row["step"] for row in single]
    for row_one, row_two in zip(single[1:3], sharded[1:3]):  # the two sharded steps
        assert abs(row_one["losses/nll"] - row_two["losses/nll"]) < 1e-4
        assert abs(row_one["losses/grad_norm"] - row_two["losses/grad_norm"]) < 1e-4
        for key in ("memory/parameters_mib", "memory/optimizer_state_mib"):
            # Half, up to the rounding of odd-sized tensors to whole rows per process.
            assert 0.49 < row_two[key] / row_one[key] < 0.51, (key, row_one[key], row_two[key])
    assert sharded[3]["memory/parameters_mib"] == single[3]["memory/parameters_mib"]  # resumed whole


def test_an_unsharded_dpo_checkpoint_resumes_sharded_with_lora(tmp_path):
    """dpo with LoRA adapters: one process for 2 steps, resumed by 2 sharded processes for 2 more, ends as one process
    for 4 steps (the optimizer state saved by index is handed to the sharded optimizer by name)."""
    command = ["dpo", *COMMON, "--beta", "0.1", "--lora-r", "4", "--lr-schedule", "constant"]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*command, "--max-steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    run(["dpo", "--resume", str(tmp_path / "resumed"), "--max-steps", "4", "--sharding", "fsdp"], 2)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "resumed"))
    single, resumed = metrics(tmp_path / "one"), metrics(tmp_path / "resumed")
    for row_one, row_two in zip(single[3:], resumed[3:]):  # the sharded steps
        assert abs(row_one["losses/dpo"] - row_two["losses/dpo"]) < 1e-4
        assert abs(row_one["eval/logp_accuracy"] - row_two["eval/logp_accuracy"]) < 1e-6
        assert 0.49 < row_two["memory/optimizer_state_mib"] / row_one["memory/optimizer_state_mib"] < 0.51


@pytest.mark.parametrize("stage", ["reward", "grpo", "rlhf"])
def test_stages_without_sharding_say_so_in_one_line(stage, tmp_path, capsys):
    assert cli.main([stage, *COMMON, "--sharding", "fsdp", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"field 'sharding' fsdp is implemented for sft and dpo only so far; {stage} runs data "
                          f"parallel (none), got 'fsdp'") and "\n" not in error
    assert not (tmp_path / "run").exists()
