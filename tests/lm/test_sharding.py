"""Sharding with torch FSDP2 (`--sharding fsdp`, lm/sharding.py) under torchrun on the CPU (gloo): two processes end
with the parameters of one while each holds half of the parameters and of the optimizer state, and a checkpoint
resumes on another number of processes, sharded or not."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import COMMON, final_weights, run

from advantage import cli

pytestmark = pytest.mark.distributed  # torchrun, two processes


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def value_model_weights(run_dir):
    """final/value_model's body and head as one mapping (head entries as "head.weight", "head.bias")."""
    directory = run_dir / "final" / "value_model"
    weights = load_file(str(directory / "model.safetensors"))
    head = load_file(str(directory / "scalar_head.safetensors"))
    weights.update({f"head.{name}": tensor for name, tensor in head.items()})
    return weights


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


def test_a_sharded_reward_model_with_lora_is_one_process_and_its_final_model_is_merged(tmp_path):
    """reward (Bradley-Terry) with LoRA adapters: 2 sharded processes end with the merged weights of one process,
    log the same losses and held-out accuracy, and each holds half the optimizer state; `score_answers`, which runs
    the body without the model's forward, is gathered like a forward."""
    command = ["reward", *COMMON, "--loss", "bt", "--lora-r", "4", "--lr-schedule", "constant"]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    run([*command, "--sharding", "fsdp", "--out", str(tmp_path / "two")], 2)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    assert not any("lora" in name for name in final_weights(tmp_path / "two"))
    single, sharded = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(single) == len(sharded) and sum("eval/accuracy" in row for row in sharded) >= 2
    for row_one, row_two in zip(single[1:], sharded[1:]):
        assert abs(row_one["losses/reward"] - row_two["losses/reward"]) < 1e-4
        if "eval/accuracy" in row_one:
            assert abs(row_one["eval/accuracy"] - row_two["eval/accuracy"]) < 1e-6
        assert 0.49 < row_two["memory/optimizer_state_mib"] / row_one["memory/optimizer_state_mib"] < 0.51


# Each process samples its own prompt; rank 0's end tokens are almost every token (it finishes within a step or two),
# rank 1's are one token (it runs to the end). Both must step together all the same: a sharded forward is collective.
SHARDED_GENERATION = """
import json, sys, torch
from advantage.lm.generation import generate
from advantage.lm.models import build_model
from advantage.lm.sharding import shard
from advantage.run.processes import Processes

processes = Processes("cpu")
model = build_model("nano", seed=1)
vocabulary = model.config.vocab_size
ends = list(range(3, vocabulary)) if processes.rank == 0 else [3]
prompt = [[5, 6, 7]] if processes.rank == 0 else [[8, 9, 10, 11]]
def sample(model):
    return generate(model, prompt, samples_per_prompt=3, max_new_tokens=12, eos_id=ends, pad_id=0,
                    generator=torch.Generator().manual_seed(7))
whole = sample(model)
sharded = sample(shard(model, processes.world_size))
with open(f"{sys.argv[1]}/rank{processes.rank}.json", "w") as out:  # not stdout: two processes' lines interleave
    json.dump({"whole": whole.completions, "sharded": sharded.completions,
               "log_probs": (whole.sampled_log_probs - sharded.sampled_log_probs).abs().max().item()}, out)
"""


def test_sharded_generation_steps_together_until_every_process_has_finished(tmp_path):
    script = tmp_path / "generation.py"
    script.write_text(SHARDED_GENERATION)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path)], env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert max(map(len, results[0]["sharded"])) <= 2 < max(map(len, results[1]["sharded"]))
    for row in results.values():  # the same completions as the whole model's, whoever finished first
        assert row["sharded"] == row["whole"] and row["log_probs"] < 1e-5


def test_sharded_grpo_is_data_parallel_grpo_with_half_the_memory(tmp_path):
    """GRPO, full fine-tuning with a KL to a frozen reference, 2 processes: sharded (policy and reference) ends with the
    weights of the unsharded run, the same rewards and losses, half the optimizer state per process; the held-out
    evaluation runs on both processes."""
    (tmp_path / "length.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    command = ["grpo", *COMMON, "--group-size", "4", "--max-new-tokens", "6", "--beta", "0.04", "--eval-every", "2",
               "--reward-functions", f"{tmp_path / 'length.py'}:length", "--lr-schedule", "constant"]
    run([*command, "--out", str(tmp_path / "data_parallel")], 2)
    run([*command, "--sharding", "fsdp", "--out", str(tmp_path / "sharded")], 2)
    assert_same_weights(final_weights(tmp_path / "data_parallel"), final_weights(tmp_path / "sharded"))
    whole, sharded = metrics(tmp_path / "data_parallel"), metrics(tmp_path / "sharded")
    assert [row["step"] for row in whole] == [row["step"] for row in sharded]
    for row_one, row_two in zip(whole[1:], sharded[1:]):
        assert row_one["rewards/mean"] == row_two["rewards/mean"]
        assert abs(row_one["losses/grpo"] - row_two["losses/grpo"]) < 1e-5
        assert 0.49 < row_two["memory/optimizer_state_mib"] / row_one["memory/optimizer_state_mib"] < 0.51
    assert sum("eval/reward" in row for row in sharded) >= 2


def test_sharded_rlhf_resumes_data_parallel_and_ends_as_the_data_parallel_run(tmp_path):
    """RLHF-PPO, 2 processes: sharded (policy, reference, value model) for 2 steps, then resumed data parallel for 2
    more, ends with the policy and the value model of the data-parallel run of 4 steps; the sharded steps log the
    same scores and losses with half the optimizer state per process, and the sharded run's final value model is
    the one its checkpoint holds."""
    command = ["rlhf", *COMMON, "--samples-per-prompt", "2", "--max-new-tokens", "4", "--update-epochs", "1",
               "--num-minibatches", "2", "--lr-schedule", "constant"]
    run([*command, "--out", str(tmp_path / "data_parallel")], 2)
    run([*command, "--max-steps", "2", "--sharding", "fsdp", "--out", str(tmp_path / "resumed")], 2)
    from advantage.run.checkpoint import list_checkpoints, read_checkpoint

    saved = read_checkpoint(list_checkpoints(tmp_path / "resumed")[-1])[1]["value_model"]
    assert_same_weights({name.removeprefix("body."): tensor for name, tensor in saved.items()},
                        value_model_weights(tmp_path / "resumed"))
    run(["rlhf", "--resume", str(tmp_path / "resumed"), "--max-steps", "4", "--sharding", "none"], 2)
    assert_same_weights(final_weights(tmp_path / "data_parallel"), final_weights(tmp_path / "resumed"))
    assert_same_weights(value_model_weights(tmp_path / "data_parallel"), value_model_weights(tmp_path / "resumed"))
    whole, resumed = metrics(tmp_path / "data_parallel"), metrics(tmp_path / "resumed")
    assert [row["step"] for row in whole] == [row["step"] for row in resumed]
    for row_one, row_two in zip(whole[1:3], resumed[1:3]):  # the sharded steps
        assert row_one["rewards/score"] == row_two["rewards/score"]
        assert abs(row_one["losses/policy"] - row_two["losses/policy"]) < 1e-5
        assert abs(row_one["losses/value"] - row_two["losses/value"]) < 1e-5
        assert 0.49 < row_two["memory/optimizer_state_mib"] / row_one["memory/optimizer_state_mib"] < 0.51


def test_a_shared_value_head_cannot_be_sharded_and_says_so_in_one_line(tmp_path, capsys):
    assert cli.main(["rlhf", *COMMON, "--sharding", "fsdp", "--value-model", "shared", "--out",
                     str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "field 'value_model' must be separate with --sharding fsdp" in error and "\n" not in error
    assert not (tmp_path / "run").exists()
