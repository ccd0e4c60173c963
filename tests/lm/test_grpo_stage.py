"""GRPO (seed 000): reward functions checked by name, the ratio exactly 1 at the first inner step, an aggregation
exact over micro-batches and processes, exact resume, no reference model with beta 0, and learning on arithmetic."""

import gc
import math

import pytest
import torch
from lm_helpers import metrics, small_config, train_and_kill_after_second_checkpoint
from transformers import PreTrainedModel

from advantage import cli
from advantage.lm import grpo
from advantage.lm.grpo import SUMS, GRPOConfig, MicroBatch, micro_batch_loss, train
from advantage.lm.logprobs import collate_shared_prompt
from advantage.lm.models import build_model
from advantage.lm.online import OnlineModels
from advantage.lm.rewards import RewardFunction, RewardFunctionError, load_reward_function, reward_functions
from advantage.objectives.grpo import group_normalized_advantages

torch.set_num_threads(1)


def quiet(**fields):
    """A small GRPO config on the built-in nano model and arithmetic task, without TensorBoard or progress."""
    defaults = dict(task="arithmetic", task_max_operand=9, task_train_size=24, task_eval_size=6, batch_size=4,
                    group_size=4, max_new_tokens=4, max_steps=4)
    return small_config(GRPOConfig, **{**defaults, **fields})


# ------------------------------------------------------------------------------------------------- reward functions


def constant(prompts, completions):
    return [0.5] * len(completions)


@pytest.mark.parametrize("function, needle", [
    (lambda p, c: 1 / 0, "reward function 'bad' raised ZeroDivisionError: division by zero"),
    (lambda p, c: None, "reward function 'bad' returned None"),
    (lambda p, c: [1.0], "reward function 'bad' returned 1 values for 2 completions"),
    (lambda p, c: [1.0, float("nan")], "reward function 'bad' returned nan for completion 1"),
    (lambda p, c: [1.0, None], "reward function 'bad' returned None for completion 1"),
    (lambda p, c: [1.0, "2"], "reward function 'bad' returned '2' for completion 1"),
    (lambda p, c: 3.0, "reward function 'bad' returned float, not a list of floats"),
])
def test_a_reward_function_that_fails_is_named_never_a_silent_zero(function, needle):
    with pytest.raises(RewardFunctionError) as error:
        RewardFunction("bad", function)(["1+1=", "2+2="], ["2", "4"])
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_reward_functions_load_by_module_or_file_and_combine_with_weights(tmp_path):
    source = tmp_path / "my_rewards.py"
    source.write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    functions = reward_functions(f"advantage.lm.tasks.arithmetic:reward, {source}:length", "2, 0.5")
    assert [f.name for f in functions] == ["advantage.lm.tasks.arithmetic:reward", f"{source}:length"]
    from advantage.lm.rewards import combined_rewards

    total, each = combined_rewards(functions, ["1+1=", "2+3="], ["2", "7x"])
    assert each["advantage.lm.tasks.arithmetic:reward"].tolist() == [1.0, 0.0]
    assert total.tolist() == [2 * 1.0 + 0.5 * 1, 2 * 0.0 + 0.5 * 2]
    from advantage.errors import UsageError

    for spec, needle in [("nomodule_xyz:f", "cannot import 'nomodule_xyz'"), ("math:nothing", "has no function"),
                         ("justaname", "not of the form module:function"), ("missing.py:f", "no file")]:
        with pytest.raises(UsageError, match=needle):
            load_reward_function(spec)
    with pytest.raises(UsageError, match="2 weights for 1 reward functions"):
        reward_functions("math:sqrt", "1,2")


# ------------------------------------------------------------------------------------------------------- the loss


# Three prompts of different lengths with G = 4 completions each (different lengths; end token 3; [7, 8, 9, 10]
# reached max_new_tokens 4 and [44] has no end token either); the rewards give each group a spread.
PROMPTS = [[5, 17, 23, 9], [40, 41], [11, 12, 13, 14, 15, 16]]
COMPLETIONS = [[[33, 34, 3], [60, 3], [7, 8, 9, 10], [3]], [[80, 81, 3], [9, 9, 3], [1, 3], [44]],
               [[30, 3], [31, 32, 3], [3], [50, 51, 52, 3]]]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2, 0.0, 0.0, 1.0, 0.3])


def micro_batches_of(model, micro_batches, old=False):
    """PROMPTS with their COMPLETIONS, split into micro-batches of whole groups, with the advantages of REWARDS."""
    advantages = group_normalized_advantages(REWARDS, 4)
    size = len(PROMPTS) // micro_batches
    result = []
    for start in range(0, len(PROMPTS), size):
        batch = collate_shared_prompt(PROMPTS[start:start + size], COMPLETIONS[start:start + size], 0)
        old_log_probs = OnlineModels(model, None, None, 0, (3,)).policy_log_probs(batch, 1.0) if old else None
        result.append(MicroBatch(batch, advantages[start * 4:(start + size) * 4], old_log_probs, None))
    return result


def gradient(model, micro_batches, config):
    model.zero_grad(set_to_none=True)
    num_tokens = sum(float(m.loss_mask().sum()) for m in micro_batches)
    num_sequences = sum(m.batch.answer_ids.shape[0] for m in micro_batches)
    total = 0.0
    for micro_batch in micro_batches:
        loss, _ = micro_batch_loss(model, micro_batch, config, num_tokens, num_sequences)
        loss.backward()
        total += float(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_the_loss_is_exact_over_micro_batches_and_processes(aggregation, level):
    """One batch of 3 groups, or 3 micro-batches of 1 (which is also what 3 processes compute: each normalises by
    the whole batch's counts and the gradients are summed): the same loss and gradient, in every aggregation, with
    the token's ratio or GSPO's answer's ratio."""
    model = build_model("nano", seed=2)
    config = quiet(aggregation=aggregation, beta=0.0, importance_ratio_level=level)
    whole_loss, whole = gradient(model, micro_batches_of(model, 1), config)
    split_loss, split = gradient(model, micro_batches_of(model, 3), config)
    assert math.isclose(whole_loss, split_loss, rel_tol=1e-5, abs_tol=1e-7)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=2e-6, rtol=1e-4, msg=name)
    assert any(bool(g.abs().sum() > 0) for g in whole.values())


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_answers_cut_at_max_new_tokens_are_left_out_of_the_loss_but_not_of_the_baseline(aggregation):
    """mask_truncated_completions: the loss and gradient of the batch are the sum over its complete answers alone,
    each with the advantage its whole group gave it, normalised by the complete answers' tokens and by every
    answer (a cut answer adds 0 to the per-answer mean, as in TRL)."""
    model = build_model("nano", seed=2)
    config = quiet(aggregation=aggregation, beta=0.0, mask_truncated_completions=True)
    whole = micro_batches_of(model, 1)[0]
    ends_answer = [answer[-1] == 3 for group in COMPLETIONS for answer in group]
    assert ends_answer.count(False) == 2
    masked = MicroBatch(whole.batch, whole.advantages, None, None, torch.tensor(ends_answer, dtype=torch.float32))
    masked_loss, masked_grad = gradient(model, [masked], config)
    complete = [(prompt, answer, advantage) for (prompt, group), advantages in
                zip(zip(PROMPTS, COMPLETIONS), whole.advantages.view(3, 4)) for answer, advantage in
                zip(group, advantages) if answer[-1] == 3]
    num_tokens, num_sequences = float(sum(len(answer) for _, answer, _ in complete)), 12.0
    model.zero_grad(set_to_none=True)
    alone_loss = 0.0
    for prompt, answer, advantage in complete:
        alone = MicroBatch(collate_shared_prompt([prompt], [[answer]], 0), advantage.reshape(1), None, None)
        loss, _ = micro_batch_loss(model, alone, config, num_tokens, num_sequences)
        loss.backward()
        alone_loss += float(loss.detach())
    assert math.isclose(masked_loss, alone_loss, rel_tol=1e-5, abs_tol=1e-7)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(masked_grad[name], parameter.grad, atol=2e-6, rtol=1e-4, msg=name)
    plain_loss, _ = gradient(model, [whole], quiet(aggregation=aggregation, beta=0.0))
    assert not math.isclose(plain_loss, masked_loss, rel_tol=1e-3)  # the two cut answers did count before


def test_collect_marks_the_cut_answers_and_keeps_them_in_the_baseline():
    """`collect` with fixed completions over 3 micro-batches: each micro-batch's `in_loss` is 1 exactly where its
    answer ends with an end token, the token count is the complete answers' and the answer count every answer's,
    and the advantages are those of the whole groups' rewards (with RLOO's baseline too)."""
    from advantage.lm.generation import Generated
    from advantage.lm.grpo import collect
    from advantage.lm.online import PromptExample
    from advantage.run.processes import Processes

    model = build_model("nano", seed=2)

    class FixedAnswers(OnlineModels):
        def sample(self, prompts, per_prompt, config, generator):
            return Generated([prompt.ids for prompt in prompts], [a for group in COMPLETIONS for a in group],
                             torch.zeros(12, 4), per_prompt)

    models = FixedAnswers(model, None, lambda prompts, generated: (REWARDS, {}), 0, (3, 9))  # two end tokens
    prompts = [PromptExample(f"prompt {i}", ids) for i, ids in enumerate(PROMPTS)]
    config = quiet(batch_size=3, group_size=4, gradient_accumulation_steps=3, beta=0.0,
                   mask_truncated_completions=True)
    collected = collect(models, prompts, config, torch.Generator(), Processes())
    ends = [bool(answer) and answer[-1] in (3, 9) for group in COMPLETIONS for answer in group]
    assert ends.count(False) == 2  # [7, 8, 9, 10] and [44]; [9, 9, 3] ends with 3
    assert len(collected.micro_batches) == 3
    assert torch.cat([micro.in_loss for micro in collected.micro_batches]).tolist() == [float(e) for e in ends]
    assert collected.num_tokens == sum(len(answer) for group in COMPLETIONS for answer in group if answer[-1] in (3, 9))
    assert collected.num_sequences == 12
    advantages = torch.cat([micro.advantages for micro in collected.micro_batches])
    torch.testing.assert_close(advantages, group_normalized_advantages(REWARDS, 4))
    plain = collect(models, prompts, quiet(batch_size=3, group_size=4, gradient_accumulation_steps=3, beta=0.0),
                    torch.Generator(), Processes())
    assert all(micro.in_loss is None for micro in plain.micro_batches)
    assert plain.num_tokens == sum(len(answer) for group in COMPLETIONS for answer in group) == 29
    # RLOO: each reward centred on the mean of the other three answers of its group, scaled by the group's std
    rloo = collect(models, prompts, quiet(batch_size=3, group_size=4, beta=0.0, baseline="leave_one_out"),
                   torch.Generator(), Processes())
    grouped = REWARDS.reshape(3, 4)
    others, spread = (grouped.sum(dim=1, keepdim=True) - grouped) / 3, grouped.std(dim=1, correction=0, keepdim=True)
    torch.testing.assert_close(torch.cat([micro.advantages for micro in rloo.micro_batches]),
                               ((grouped - others) / (spread + 1e-4)).reshape(-1))


def test_a_batch_of_cut_answers_only_leaves_the_weights_unchanged(tmp_path):
    """No end token can be sampled within max_new_tokens (min_new_tokens = max_new_tokens): every answer is cut,
    so with mask_truncated_completions the loss has no term and AdamW does not move a weight; without it, it does."""
    start = build_model("nano", seed=1).state_dict()
    rewards = tmp_path / "rewards.py"  # a reward that differs within a group, so that the advantages are not all 0
    rewards.write_text("def characters(prompts, completions):\n    return [float(sum(map(ord, c)) % 7) for c in "
                       "completions]\n")
    fields = dict(max_new_tokens=2, min_new_tokens=2, max_steps=2, learning_rate=1e-2, beta=0.0, eval_every=100,
                  reward_functions=f"{rewards}:characters")
    masked = train(quiet(mask_truncated_completions=True, **fields), tmp_path / "masked")
    plain = train(quiet(**fields), tmp_path / "plain")
    rows = [row for row in metrics(tmp_path / "masked") if row["step"] > 0]
    assert rows and all(row["completions/truncated"] == 1.0 for row in rows)
    assert all(torch.equal(value, start[name]) for name, value in masked.model.state_dict().items())
    assert not all(torch.equal(value, start[name]) for name, value in plain.model.state_dict().items())


def test_old_log_probs_from_a_fresh_pass_make_the_first_ratio_exactly_one():
    """pi_old is computed by the same function as pi_theta (answer_log_probs, eval mode, no graph): at the first
    inner iteration every ratio is exactly 1, so nothing is clipped and the approximate KL is exactly 0."""
    model = build_model("nano", seed=2).train()
    for micro_batch in micro_batches_of(model, 3, old=True):
        _, sums = micro_batch_loss(model, micro_batch, quiet(beta=0.0, num_iterations=2), 20.0, 12.0)
        stats = dict(zip(SUMS, sums.tolist()))
        assert stats["approx_kl_sum"] == 0.0 and stats["clip_tokens"] == 0.0 and stats["tokens"] > 0


# --------------------------------------------------------------------------------------------------------- training


def test_beta_zero_loads_no_reference_and_a_positive_beta_one(tmp_path, monkeypatch):
    alive = []
    original = grpo.micro_batch_loss

    def count_models(*args, **kwargs):
        gc.collect()
        alive.append(sum(issubclass(type(o), PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")
                         for o in gc.get_objects()))
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo, "micro_batch_loss", count_models)
    train(quiet(beta=0.0, max_steps=1), tmp_path / "beta0")
    without = alive[-1]
    train(quiet(beta=0.1, max_steps=1), tmp_path / "beta")
    assert alive[-1] == without + 1  # the frozen reference copy


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_interruption_is_exact(tmp_path, monkeypatch, lora):
    extra = dict(lora_r=4, lora_merge=True) if lora else {}
    config = quiet(max_steps=6, checkpoint_every=2, num_iterations=2, learning_rate=1e-3, beta=0.1, **extra)
    whole = train(config, tmp_path / "whole")
    train_and_kill_after_second_checkpoint(monkeypatch, train, config, tmp_path / "killed")
    from advantage.lm import session

    resumed = session.resume(tmp_path / "killed")
    for (name, expected), (_, got) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(expected, got), name
    assert [row["step"] for row in metrics(tmp_path / "killed")] == [row["step"] for row in metrics(tmp_path / "whole")]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    base = ["grpo", "--task", "arithmetic", "--task-max-operand", "9", "--task-train-size", "8", "--task-eval-size",
            "2", "--model", "builtin:nano", "--max-steps", "1", "--progress", "false", "--tensorboard", "false"]
    cases = [(["--group-size", "1"], "field 'group_size' must be >= 2"),
             (["--reward-functions", "nomodule_q:f"], "cannot import 'nomodule_q'"),
             (["--reward-functions", "tests_rewards_nan.py:f"], "no file"),
             (["--top-p", "0"], "field 'top_p' must be in (0, 1]"),
             (["--baseline", "median"], "field 'baseline' must be one of group_mean, leave_one_out; got 'median'"),
             (["--max-new-tokens", "128"], "field 'max_new_tokens' (128) leaves no room for a prompt in "
                                           "max_length=128"),
             (["--reward-functions", "syntax_error.py:f"], "syntax_error.py:2: syntax error in the reward module"),
             (["--reward-functions", "raises_on_import.py:f"], "importing 'raises_on_import.py' raised "
                                                               "ZeroDivisionError: division by zero")]
    (tmp_path / "syntax_error.py").write_text("def f(prompts, completions):\n    return [1.0 for c in\n")
    (tmp_path / "raises_on_import.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    for flags, needle in cases:
        assert cli.main([*base, *flags, "--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err.strip()
        assert needle in error and len(error.splitlines()) == 1, error
    source = tmp_path / "nan_reward.py"
    source.write_text("def f(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    assert cli.main([*base, "--reward-functions", f"{source}:f", "--out", str(tmp_path / "nan")]) == 2
    error = capsys.readouterr().err.strip()
    assert f"reward function '{source}:f' returned nan for completion 0" in error and len(error.splitlines()) == 1
    # Prompts longer than max_length - max_new_tokens keep their end, and the run says so.
    assert cli.main([*base, "--max-length", "6", "--max-new-tokens", "4", "--out", str(tmp_path / "cut")]) == 0
    assert "prompts are longer than max_length - max_new_tokens = 2 tokens and were cut at the left" in \
        capsys.readouterr().err


@pytest.mark.learning
def test_grpo_raises_the_reward_of_a_quick_sft_model(arithmetic_sft, tmp_path):
    """One-digit addition: a short SFT of the tiny model (greedy held-out accuracy 0.3), then 150 GRPO steps with
    the task's exact-match reward (16 prompts x G = 8 per step, beta 0.04). The mean reward of the sampled
    completions rises from about 0.24 to 0.5-0.6 (measured); the KL to the reference is reported. The greedy
    accuracy on the 20 held-out prompts moved from 0.3 to 0.4 in that run: the 80 training prompts are learnt
    faster than the skill generalises (benchmarks/README.md has the longer runs)."""
    sft = arithmetic_sft
    run = train(quiet(model=str(sft.run_dir / "final"), task_train_size=80, task_eval_size=20, batch_size=16,
                      group_size=8, max_new_tokens=4, max_steps=150, learning_rate=5e-4, lr_schedule="constant",
                      beta=0.04, eval_every=75, log_every=5), tmp_path / "grpo")
    rows = metrics(run.run_dir)
    evaluations = [row for row in rows if "eval/reward" in row]
    trained = [row for row in rows if "rewards/mean" in row]
    first, last = evaluations[0], evaluations[-1]
    early = sum(row["rewards/mean"] for row in trained[:3]) / 3
    late = sum(row["rewards/mean"] for row in trained[-3:]) / 3
    print("held-out greedy accuracy", first["eval/reward"], "->", last["eval/reward"], "sampled reward", early, "->",
          late, "kl", trained[-1]["kl/per_token"])
    assert late >= early + 0.2
    assert last["eval/reward"] >= first["eval/reward"] - 0.1
    assert 0 < trained[-1]["kl/per_token"] < 1.0
    assert {"rewards/advantage.lm.tasks.arithmetic:reward", "completions/mean_length", "policy/clip_fraction",
            "policy/approx_kl", "time/generation_s", "time/training_s", "losses/grpo"} <= set(trained[-1])
    assert {"config.json", "model.safetensors"} <= {p.name for p in (run.run_dir / "final").iterdir()}


@pytest.mark.learning
def test_gspo_raises_the_reward_of_a_quick_sft_model(arithmetic_sft, tmp_path):
    """The same start and task with GSPO's ratio per answer (docs/math.md §6b) and its narrow clip, two optimizer
    steps on each batch so that the ratios leave 1 and the clip acts, 200 steps (100 batches). Measured: the mean
    sampled reward of the first 20 steps (10 batches) 0.345, of the last 20 0.620."""
    run = train(quiet(model=str(arithmetic_sft.run_dir / "final"), task_train_size=80, task_eval_size=20,
                      batch_size=16, group_size=8, max_new_tokens=4, max_steps=200, num_iterations=2,
                      learning_rate=5e-4, lr_schedule="constant", beta=0.0, importance_ratio_level="sequence",
                      clip_range=0.02, eval_every=200, log_every=1), tmp_path / "gspo")
    rows = [row for row in metrics(run.run_dir) if "rewards/mean" in row]
    early = sum(row["rewards/mean"] for row in rows[:20]) / 20
    late = sum(row["rewards/mean"] for row in rows[-20:]) / 20
    clipped = max(row["policy/clip_fraction"] for row in rows)
    print("sampled reward", early, "->", late, "largest clip fraction", clipped)
    assert len(rows) == 200 and late >= early + 0.15
    assert clipped > 0  # whole answers were clipped at the second step on a batch


def test_cli_on_a_model_directory_with_data_and_a_reward_function_by_path(tmp_path, capsys):
    """`advantage grpo` on what a user brings: a Hugging Face model directory, a JSONL file of prompts and a reward
    function in a .py file, all given by path (nothing built in)."""
    from advantage.lm.data import write_jsonl
    from advantage.lm.models import save_pretrained
    from advantage.lm.tokenizer import build_char_tokenizer

    model_dir = save_pretrained(build_model("nano", seed=3), build_char_tokenizer(), tmp_path / "my_model")
    write_jsonl([{"prompt": f"say {word}: "} for word in ("cat", "dog", "sun", "moon")], tmp_path / "prompts.jsonl")
    (tmp_path / "scores.py").write_text("def vowels(prompts, completions):\n"
                                        "    return [sum(c in 'aeiou' for c in text) / 4 for text in completions]\n")
    assert cli.main(["grpo", "--model", str(model_dir), "--data", str(tmp_path / "prompts.jsonl"),
                     "--reward-functions", f"{tmp_path / 'scores.py'}:vowels", "--batch-size", "2", "--group-size",
                     "3", "--max-new-tokens", "4", "--max-steps", "2", "--progress", "false", "--tensorboard",
                     "false", "--out", str(tmp_path / "run")]) == 0
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and f"rewards/{tmp_path / 'scores.py'}:vowels" in rows[-1]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
