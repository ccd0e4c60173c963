"""RLHF-PPO (seeds 000, 001, 003): GAE over tokens, per-token KL rewards, the value model, PPO-ptx, the adaptive KL,
exact resume, and learning on the arithmetic task with a reward model trained by `advantage reward`."""


import pytest
import torch
from lm_helpers import arithmetic_preferences, metrics, small_config, train_and_kill_after_second_checkpoint

from advantage import cli
from advantage.lm import session as lm_session
from advantage.lm.data import write_jsonl
from advantage.lm.models import ScalarHeadModel
from advantage.lm.reward import RewardConfig
from advantage.lm.reward import train as train_reward
from advantage.lm.rlhf import RLHFConfig, train
from advantage.objectives.rlhf import advantages_and_returns

torch.set_num_threads(1)


def quiet(**fields):
    """A small RLHF config on the built-in nano model and arithmetic task, without TensorBoard or progress."""
    defaults = dict(task="arithmetic", task_max_operand=9, task_train_size=24, task_eval_size=6, batch_size=4,
                    samples_per_prompt=2, max_new_tokens=4, max_steps=4, update_epochs=2, num_minibatches=2)
    return small_config(RLHFConfig, **{**defaults, **fields})


def test_gae_over_tokens_by_hand():
    """gamma = lambda = 1: A_t = (sum of the rewards from t on) - V(s_t), the answer's end terminal; returns = A + V.
    Padding stays 0."""
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.2, 0.1, 9.0], [0.4, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    advantages, returns = advantages_and_returns(rewards, values, mask, 1.0, 1.0, whiten=False)
    expected = torch.tensor([[0.7 - 0.3, 0.8 - 0.2, 1.0 - 0.1, 0.0], [0.5 - 0.4, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns[mask], (expected + values)[mask])
    # lambda = 0: one-step TD errors, delta_t = r_t + V(s_{t+1}) - V(s_t), and r_T - V(s_T) at the end.
    td, _ = advantages_and_returns(rewards, values, mask, 1.0, 0.0, whiten=False)
    torch.testing.assert_close(td[0, :3], torch.tensor([-0.1 + 0.2 - 0.3, -0.2 + 0.1 - 0.2, 1.0 - 0.1]))
    whitened, _ = advantages_and_returns(rewards, values, mask, 1.0, 1.0, whiten=True)
    assert abs(float(whitened[mask].mean())) < 1e-6 and float(whitened[~mask].abs().sum()) == 0


def test_a_run_logs_kl_value_and_ptx_and_adapts_beta(tmp_path):
    ptx = tmp_path / "pretrain.jsonl"
    write_jsonl([{"text": "1+2=3\n"}, {"text": "4+4=8\n"}, {"text": "9+0=9\n"}], ptx)
    run = train(quiet(max_steps=8, ptx_coef=0.5, ptx_data=str(ptx), target_kl=10.0, beta=0.1,
                      learning_rate=1e-3), tmp_path / "run")
    rows = [row for row in metrics(run.run_dir) if "losses/policy" in row]
    assert len(rows) == 8
    for key in ("rewards/score", "rewards/total", "kl/per_answer", "kl/beta", "losses/value", "losses/ptx",
                "policy/clip_fraction", "value/explained_variance", "completions/mean_length"):
        assert key in rows[-1], key
    assert all(row["losses/ptx"] > 0 for row in rows)
    # Two rollouts of 2 epochs x 2 minibatches; the KL per answer is far below target / 1.5, so beta halves.
    assert [row["kl/beta"] for row in rows] == [0.1] * 4 + [0.05] * 4
    assert (run.run_dir / "final" / "value_model" / "scalar_head.safetensors").exists()
    ScalarHeadModel.from_pretrained(run.run_dir / "final" / "value_model")


@pytest.mark.parametrize("lora, value_model", [(False, "separate"), (True, "separate"), (True, "shared")])
def test_resume_after_interruption_is_exact(tmp_path, monkeypatch, lora, value_model):
    extra = dict(lora_r=4) if lora else {}
    config = quiet(max_steps=8, checkpoint_every=2, learning_rate=1e-3, target_kl=0.01, value_model=value_model,
                   **extra)
    whole = train(config, tmp_path / "whole")
    train_and_kill_after_second_checkpoint(monkeypatch, train, config, tmp_path / "killed")
    resumed = lm_session.resume(tmp_path / "killed")
    for (name, expected), (_, got) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(expected, got), name
    whole_value = ScalarHeadModel.from_pretrained(tmp_path / "whole" / "final" / "value_model").state_dict()
    resumed_value = ScalarHeadModel.from_pretrained(tmp_path / "killed" / "final" / "value_model").state_dict()
    for name, tensor in whole_value.items():
        assert torch.equal(tensor, resumed_value[name]), name
    assert [r["kl/beta"] for r in metrics(tmp_path / "killed") if "kl/beta" in r] == \
        [r["kl/beta"] for r in metrics(tmp_path / "whole") if "kl/beta" in r]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    base = ["rlhf", "--task", "arithmetic", "--task-max-operand", "9", "--task-train-size", "8", "--task-eval-size",
            "2", "--model", "builtin:nano", "--max-steps", "1", "--progress", "false", "--tensorboard", "false"]
    cases = [(["--ptx-coef", "0.1"], "field 'ptx_data' is required when ptx_coef > 0"),
             (["--gamma", "1.5"], "field 'gamma' must be in [0, 1]"),
             (["--num-minibatches", "3"], "field 'num_minibatches' must divide batch_size (16)"),
             (["--reward-model", "no/such/dir"], "no/such/dir")]
    for flags, needle in cases:
        assert cli.main([*base, *flags, "--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err.strip()
        assert needle in error and len(error.splitlines()) == 1, error


@pytest.mark.learning
def test_rlhf_with_a_trained_reward_model_raises_the_accuracy_of_a_quick_sft_model(arithmetic_sft, tmp_path):
    """The whole pipeline on one-digit addition: SFT of the tiny model, a reward model on the task's preference pairs
    (`advantage reward`, held-out pair accuracy 0.9), then RLHF-PPO against that reward model (the value model
    initialised from it). Over the first and the last epoch of prompts (5 rollouts each) the reward model's score
    of the sampled answers rose from -0.93 to 1.49 and their exact-match accuracy from 0.27 to 0.50 (measured),
    with a KL to the SFT model of about 0.6 nats per answer.

    The KL coefficient matters: with beta 0.05 the score climbed to 7 while the accuracy fell to 0.09, the policy
    finding the answers the reward model overrates (the over-optimisation the KL term is there to prevent)."""
    sft = arithmetic_sft
    pairs, _ = arithmetic_preferences(sft, tmp_path, seeds=10)
    reward_config = small_config(RewardConfig, model=str(sft.run_dir / "final"), data=str(pairs),
                                 learning_rate=3e-4, batch_size=32, max_steps=400, lr_schedule="cosine")
    reward = train_reward(reward_config, tmp_path / "reward")
    run = train(quiet(model=str(sft.run_dir / "final"), reward_model=str(reward.run_dir / "final"),
                      task_train_size=80, task_eval_size=20, batch_size=16, samples_per_prompt=8, max_new_tokens=4,
                      max_steps=200, update_epochs=2, num_minibatches=1, learning_rate=3e-4, beta=1.0,
                      lr_schedule="constant", eval_every=200, log_every=2), tmp_path / "rlhf")
    rows = [row for row in metrics(run.run_dir) if "rewards/score" in row]
    assert len(rows) == 100  # one line per rollout

    def mean(key, chosen):
        return sum(row[key] for row in chosen) / len(chosen)

    evaluations = [row for row in metrics(run.run_dir) if "eval/exact_match" in row]
    first, last = rows[:5], rows[-5:]  # an epoch of the 80 prompts each
    print("reward-model score", mean("rewards/score", first), "->", mean("rewards/score", last),
          "sampled exact match", mean("rewards/exact_match", first), "->", mean("rewards/exact_match", last),
          "held-out greedy exact match", evaluations[0]["eval/exact_match"], "->", evaluations[-1]["eval/exact_match"],
          "kl", mean("kl/per_answer", last))
    assert mean("rewards/score", last) > mean("rewards/score", first) + 1.0
    assert mean("rewards/exact_match", last) > mean("rewards/exact_match", first) + 0.1
    assert evaluations[-1]["eval/exact_match"] >= evaluations[0]["eval/exact_match"]
    assert 0 < mean("kl/per_answer", last) < 2.0


def test_cli_on_a_model_directory_with_data_and_a_reward_model_by_path(tmp_path):
    """`advantage rlhf` on a Hugging Face model directory, a JSONL file of prompts and a reward model directory (as
    `advantage reward` writes it), all given by path."""
    from advantage.lm.models import build_model, save_pretrained
    from advantage.lm.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model_dir = save_pretrained(build_model("nano", seed=3), tokenizer, tmp_path / "my_model")
    ScalarHeadModel.from_causal_lm(build_model("nano", seed=4), seed=4).save_pretrained(tmp_path / "my_rm", tokenizer)
    write_jsonl([{"prompt": f"say {word}: "} for word in ("cat", "dog", "sun", "moon")], tmp_path / "prompts.jsonl")
    assert cli.main(["rlhf", "--model", str(model_dir), "--data", str(tmp_path / "prompts.jsonl"), "--reward-model",
                     str(tmp_path / "my_rm"), "--batch-size", "2", "--samples-per-prompt", "2", "--max-new-tokens",
                     "4", "--max-steps", "2", "--update-epochs", "2", "--progress", "false", "--tensorboard", "false",
                     "--out", str(tmp_path / "run")]) == 0
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and "rewards/score" in rows[-1]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_a_shared_value_head_trains_the_policy_body_with_the_value_loss(tmp_path):
    """value_model shared: the head sits on the policy's body, so the value loss changes the policy (unlike a
    separate value model, with which vf_coef has no effect on the policy at all)."""
    weights = {}
    for name, fields in {"shared": dict(value_model="shared", vf_coef=1.0),
                         "shared_no_value": dict(value_model="shared", vf_coef=0.0),
                         "separate": dict(value_model="separate", vf_coef=1.0),
                         "separate_other_coef": dict(value_model="separate", vf_coef=0.0)}.items():
        run = train(quiet(max_steps=2, learning_rate=1e-3, **fields), tmp_path / name)
        weights[name] = {k: v.clone() for k, v in run.model.state_dict().items()}
    differs = any(not torch.equal(weights["shared"][k], weights["shared_no_value"][k]) for k in weights["shared"])
    assert differs
    for key, tensor in weights["separate"].items():
        assert torch.equal(tensor, weights["separate_other_coef"][key]), key
