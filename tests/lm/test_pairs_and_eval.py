"""On-policy preference pairs (`advantage pairs`) and the evaluation of a language model (`advantage eval`)."""

import json

import pytest
import torch
from lm_helpers import metrics

from advantage import cli
from advantage.lm.data import load_rows, preference_triples
from advantage.lm.models import save_builtin

torch.set_num_threads(1)

LENGTH_REWARD = "def longer(prompts, completions, **kwargs):\n    return [len(c) for c in completions]\n"


def run(capsys, *arguments):
    """cli.main(arguments) -> (exit code, stdout, stderr)."""
    code = cli.main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pairs_keep_a_best_and_a_worst_answer_per_prompt_and_feed_dpo(tmp_path, capsys):
    (tmp_path / "reward.py").write_text(LENGTH_REWARD)
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run(capsys, "pairs", "--model", "builtin:nano", "--task", "arithmetic", "--task-max-operand",
                          "9", "--task-train-size", "6", "--task-eval-size", "2", "--reward-functions",
                          f"{tmp_path / 'reward.py'}:longer", "--samples-per-prompt", "4", "--max-new-tokens", "6",
                          "--out", out, "--progress", "false")
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = load_rows(out, "preference")
    assert summary["prompts"] == 6 and summary["pairs"] == len(rows) >= 1
    for prompt, chosen, rejected in preference_triples(rows):
        assert len(chosen) > len(rejected)  # the longer answer is preferred by the length reward
    assert not list(tmp_path.glob(".*"))  # the task's files went to a temporary directory
    code, _, _ = run(capsys, "dpo", "--model", "builtin:nano", "--data", out, "--batch-size", "1", "--max-steps", "1",
                     "--progress", "false", "--tensorboard", "false", "--out", tmp_path / "dpo")
    assert code == 0 and metrics(tmp_path / "dpo")[-1]["step"] == 1


def test_pairs_of_a_chat_model_are_conversations_with_the_answer_column(smollm2_cut, tmp_path, capsys):
    (tmp_path / "reward.py").write_text(LENGTH_REWARD.replace("len(c)", "len(c[0]['content'])"))
    out = tmp_path / "pairs.jsonl"
    code, _, _ = run(capsys, "pairs", "--model", smollm2_cut, "--task", "arithmetic", "--task-format", "chat",
                     "--task-train-size", "3", "--task-eval-size", "1", "--reward-functions",
                     f"{tmp_path / 'reward.py'}:longer", "--samples-per-prompt", "3", "--max-new-tokens", "4",
                     "--temperature", "2", "--out", out, "--progress", "false")
    assert code == 0
    for row in load_rows(out, "preference"):
        assert row.columns["prompt"][0]["role"] == "user" and row.columns["answer"].isdigit()
        assert row.columns["chosen"][0]["role"] == row.columns["rejected"][0]["role"] == "assistant"


def test_pairs_refuse_prompts_whose_answers_all_score_the_same(tmp_path, capsys):
    (tmp_path / "reward.py").write_text("def flat(prompts, completions):\n    return [1.0] * len(completions)\n")
    code, _, error = run(capsys, "pairs", "--model", "builtin:nano", "--task", "arithmetic", "--task-train-size",
                         "2", "--task-eval-size", "1", "--reward-functions", f"{tmp_path / 'reward.py'}:flat",
                         "--max-new-tokens", "2", "--out", tmp_path / "pairs.jsonl", "--progress", "false")
    assert code == 2 and "no pairs" in error and not (tmp_path / "pairs.jsonl").exists()


def test_eval_scores_greedy_answers_of_a_model_a_run_or_the_task(smollm2_cut, tmp_path, capsys):
    code, stdout, _ = run(capsys, "eval", smollm2_cut, "--task", "arithmetic", "--task-format", "chat",
                          "--task-eval-size", "3", "--max-new-tokens", "4")
    assert code == 0
    result = json.loads(stdout)
    assert result["prompts"] == 3 and 0.0 <= result["reward"] <= 1.0 and result["mean_length"] <= 4
    assert len(result["examples"]) == 3 and "What is" in result["examples"][0][0]

    code, _, _ = run(capsys, "grpo", "--model", "builtin:nano", "--task", "arithmetic", "--task-max-operand", "9",
                     "--task-train-size", "8", "--task-eval-size", "5", "--batch-size", "2", "--group-size", "2",
                     "--max-new-tokens", "3", "--max-steps", "1", "--progress", "false", "--tensorboard", "false",
                     "--out", tmp_path / "grpo")
    assert code == 0
    code, stdout, _ = run(capsys, "eval", tmp_path / "grpo")  # its own held-out prompts and verifier
    result = json.loads(stdout)
    assert code == 0 and result["prompts"] == 5 and result["model"] == str(tmp_path / "grpo" / "final")
    assert result["reward"] == pytest.approx(metrics(tmp_path / "grpo")[-1]["eval/reward"])

    model_dir = save_builtin("nano", tmp_path / "model")
    for arguments, message in [
        ([model_dir], "field 'eval_data' is required"),
        ([model_dir, "--task", "arithmetic"], None),
        ([model_dir, "--eval-data", tmp_path / "grpo" / "data" / "sft_eval.jsonl"], "field 'reward_functions'"),
        ([tmp_path / "grpo", "--episodes", "2", "--task-format", "chat"], None),
    ]:
        code, _, error = run(capsys, "eval", *arguments)
        if message is None:
            assert code == 0, error
        else:
            assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error
