"""Reward model: the reward is the scalar at the last real token; the losses are those of objectives/preference.py on
every pair of every ranking; accumulation never changes the gradient; it learns which arithmetic answer is right;
final/ reloads with ScalarHeadModel.from_pretrained; resume is exact (with and without LoRA); the CLI's contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import arithmetic_preferences, metrics, small_config, train_and_kill_after_second_checkpoint
from safetensors.torch import load_file

from advantage import cli
from advantage.lm import session as lm_session
from advantage.lm.data import write_jsonl
from advantage.lm.logprobs import collate_shared_prompt
from advantage.lm.models import ScalarHeadModel, build_model
from advantage.lm.preferences import PairwiseTally, RankedExample, best_and_worst, collate_rankings
from advantage.lm.reward import RewardConfig, accumulate_gradients, ranking_loss, ranking_rewards, train
from advantage.lm.session import quiet_transformers
from advantage.lm.sft import SFTConfig
from advantage.lm.sft import train as train_sft
from advantage.lm.tokenizer import build_char_tokenizer

torch.set_num_threads(1)

# Rankings of 2, 3 and 4 answers (best first) with prompts and answers of different lengths, so that micro-batches
# pad differently and some rankings are masked.
RANKINGS = [("12+3=", ["15\n", "16\n", "51\n"]), ("7+80=", ["87\n", "88\n"]), ("1=", ["1\n", "a longer answer\n"]),
            ("what is 99+1? ", ["100\n", "101\n", "10\n", "1000\n"]), ("x", ["y", "z"]), ("45+45=", ["90\n", "91\n"]),
            ("long prompt " * 3, ["ok\n", "no\n", "maybe\n"]), ("2+2=", ["4\n", "5\n"])]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def tokenized(tokenizer, rankings=RANKINGS):
    eos = tokenizer.eos_token_id
    return [RankedExample(tokenizer.encode(prompt), [tokenizer.encode(answer) + [eos] for answer in answers])
            for prompt, answers in rankings]


def reward_model(seed=3):
    return ScalarHeadModel.from_causal_lm(build_model("nano", seed=seed), seed=seed)


def quiet(**fields):
    """A small reward config on the built-in nano model that writes no TensorBoard files and shows no progress."""
    return small_config(RewardConfig, **fields)


# ---------------------------------------------------------------------------------------------- rewards and losses


def test_rewards_are_read_at_the_last_token_of_each_answer_whatever_the_batch(tokenizer):
    examples = tokenized(tokenizer)
    model = reward_model().eval()
    batch = collate_rankings(examples, pad=0)
    assert batch.mask.tolist()[:2] == [[True, True, True, False], [True, True, False, False]]
    with torch.no_grad():
        rewards = ranking_rewards(model, batch)  # (8, 4)
        for b, example in enumerate(examples):
            for k, answer in enumerate(example.completion_ids):
                ids = torch.tensor([example.prompt_ids + answer])
                alone = model(ids)[0, -1]  # the scalar at the sequence's last token (EOS), without padding
                assert math.isclose(float(rewards[b, k]), float(alone), abs_tol=1e-5), (b, k)


def test_losses_are_the_seeds_formulas_over_every_pair(tokenizer):
    """Against slow loops: K-wise is Bradley-Terry averaged over the C(K,2) pairs of each ranking (seed 000),
    Plackett-Luce picks the best of the remaining answers at every place (seed 004)."""
    rewards = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    kwise = plackett_luce = 0.0
    for row, present in zip(rewards, mask):
        r = row[present]
        pairs = [(i, j) for i in range(len(r)) for j in range(i + 1, len(r))]
        kwise -= sum(float(F.logsigmoid(r[i] - r[j])) for i, j in pairs) / len(pairs) / 2
        plackett_luce -= sum(float(r[k] - torch.logsumexp(r[k:], 0)) for k in range(len(r))) / 2
    assert math.isclose(float(ranking_loss(rewards, mask, "kwise")), kwise, rel_tol=1e-6)
    assert math.isclose(float(ranking_loss(rewards, mask, "plackett_luce")), plackett_luce, rel_tol=1e-6)
    pairs = rewards[:, :2]
    for loss in ("bt", "kwise", "plackett_luce"):  # for K = 2 the three losses are the same
        assert math.isclose(float(ranking_loss(pairs, mask[:, :2], loss)),
                            float(-F.logsigmoid(pairs[:, 0] - pairs[:, 1]).mean()), rel_tol=1e-6)

    tally = PairwiseTally()
    tally.add(rewards, mask)  # pairs: 2 > 0.5, 2 > -1, 0.5 > -1 (all right); 0.3 < 0.9 (wrong)
    means = tally.means("eval/")
    assert tally.pairs == 4 and means["eval/accuracy"] == 0.75
    assert math.isclose(means["eval/margin"], (1.5 + 3.0 + 1.5 - 0.6) / 4, rel_tol=1e-6)
    assert math.isclose(means["eval/chosen"], (2.0 + 0.3) / 2, rel_tol=1e-6)
    assert math.isclose(means["eval/rejected"], (-1.0 + 0.9) / 2, rel_tol=1e-6)  # the last present answer
    assert [len(e.completion_ids) for e in best_and_worst(tokenized(tokenizer))] == [2] * len(RANKINGS)


def test_scoring_each_prompt_once_equals_scoring_the_prompt_repeated():
    """score_answers (the prompt through the body once, its K answers on its cache) gives the scores, and the
    gradients, of score_last_token on each prompt + answer sequence; an empty answer scores the prompt alone."""
    model = reward_model()
    batch = collate_shared_prompt([[5, 6, 7, 8], [9], [10, 11, 12]], [[[20, 21], [22], [23, 24, 25]],
                                                                       [[26, 27, 28, 29], []], [[30], [31, 32]]], 0)
    sequences = batch.concatenated()
    weights = torch.linspace(-1.0, 1.0, batch.answer_ids.shape[0])
    results = []
    for score in (lambda: model.score_answers(batch),
                  lambda: model.score_last_token(sequences.input_ids, sequences.attention_mask)):
        model.zero_grad(set_to_none=True)
        scores = score()
        (scores * weights).sum().backward()
        results.append((scores.detach(), [p.grad.clone() for p in model.parameters()]))
    (shared, shared_grads), (repeated, repeated_grads) = results
    assert shared.shape == (9,) and torch.allclose(shared, repeated, atol=1e-5)
    for ours, theirs in zip(shared_grads, repeated_grads):
        assert torch.allclose(ours, theirs, atol=1e-5)


# ----------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("loss,center", [("bt", 0.0), ("kwise", 0.0), ("plackett_luce", 0.0), ("bt", 0.5),
                                         ("kwise", 0.5)])
def test_batch_8x1_equals_2x4_equals_1x8(tokenizer, loss, center):
    """The same loss and gradient for any accumulation: each ranking weighs 1 / B of the batch mean.

    Gradients agree to 5e-6 (largest entry ~0.4; with the centring term 5e-6 of the largest entry, which reaches
    37 on the random head's scores): a prompt's K answers add their gradients into the prompt's computation in a
    different order when the batch is split, which moves the last float32 bits.
    """
    examples = tokenized(tokenizer)
    if loss == "bt":
        examples = best_and_worst(examples)
    results = []
    for micro_batches in (1, 4, 8):  # micro-batches of 8, 2 and 1 rankings
        model = reward_model()
        model.head.bias.requires_grad_(center > 0)  # as `train` sets it
        value, tally, _ = accumulate_gradients(model, examples, micro_batches, pad=0, loss=loss,
                                               center_rewards_coefficient=center)
        results.append((value, tally, {name: p.grad.clone() for name, p in model.named_parameters()
                                       if p.grad is not None}))
    reference_loss, reference_tally, reference = results[0]
    assert reference_tally.pairs == (8 if loss == "bt" else 3 + 1 + 1 + 6 + 1 + 1 + 3 + 1)
    scale = max(1.0, *(float(grad.abs().max()) for grad in reference.values()))
    for value, tally, grads in results[1:]:
        assert math.isclose(value, reference_loss, abs_tol=1e-6 * max(1.0, reference_loss))
        assert tally.correct == reference_tally.correct
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], atol=5e-6 * scale, rtol=0, msg=name)
    assert reference["head.weight"].abs().max() > 1e-3  # a real gradient
    assert (reference.get("head.bias") is not None) == (center > 0)  # only the centring term moves the level


def test_one_training_step_is_the_same_for_any_accumulation(tmp_path):
    """Through the training loop: one AdamW step gives the same weights for any accumulation (atol 1e-6).

    Adam's first step is lr * g / (|g| + eps) per entry, so an entry whose gradient is within rounding of 0 moves
    by up to lr times its relative rounding error; lr = 1e-5 keeps that under the tolerance (at 1e-4 a few entries
    differ by 1.1e-6). The gradients themselves are compared directly in the test above.
    """
    data = tmp_path / "train.jsonl"
    write_jsonl([{"prompt": prompt, "responses": answers} for prompt, answers in RANKINGS], data)
    finals = []
    for accumulation in (1, 4, 8):
        run = train(quiet(data=str(data), loss="plackett_luce", batch_size=8, gradient_accumulation_steps=accumulation,
                          max_steps=1, learning_rate=1e-5), tmp_path / f"accumulate{accumulation}")
        finals.append({**load_file(str(run.run_dir / "final" / "model.safetensors")),
                       **load_file(str(run.run_dir / "final" / "scalar_head.safetensors"))})
    for name, tensor in finals[0].items():
        for other in finals[1:]:
            torch.testing.assert_close(other[name], tensor, atol=1e-6, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------------ learning


@pytest.mark.learning
def test_reward_model_learns_which_arithmetic_answer_is_right(tmp_path):
    """Held-out pairwise accuracy from chance to > 0.85 on the arithmetic task's preference pairs.

    A quick SFT on two-digit addition (operands 0..19, 360 training prompts, 800 steps), then Bradley-Terry on the
    task's preference pairs with the wrong answers of 4 task seeds (1440 training pairs): on the 40 held-out prompts
    (160 pairs) the accuracy went from chance (0.39) to 0.94 on an AVX2 host, above 0.9 at every evaluation from
    step 160 on. On an AVX-512 host (other float kernels, so another SFT model and other pairs) the same recipe went
    from 0.36 to 0.88, level at 0.86-0.89 from step 240 on (2026-12-01): the bar is 0.85, 4 pairs below that. The
    recipe is seed-sensitive: with seeds 2 and 3 the nano model ends near 0.8 (the 4x larger tiny model did no
    better on seed 2), and learning rate 5e-4 swung between 0.78 and 0.91 from one evaluation to the next.
    """
    sft = train_sft(SFTConfig(model="builtin:nano", task="arithmetic", task_max_operand=19, task_train_size=360,
                              task_eval_size=40, learning_rate=3e-3, batch_size=32, max_steps=800, warmup_steps=10,
                              lr_schedule="cosine", eval_every=800, checkpoint_every=800, progress=False,
                              tensorboard=False, seed=1), tmp_path / "sft")
    train_file, eval_file = arithmetic_preferences(sft, tmp_path, seeds=4)
    run = train(quiet(model=str(sft.run_dir / "final"), data=str(train_file), eval_data=str(eval_file),
                      learning_rate=3e-4, batch_size=32, max_steps=400, lr_schedule="cosine", log_every=10,
                      tensorboard=True), tmp_path / "reward")
    rows = metrics(run.run_dir)
    evaluations = [row for row in rows if "eval/accuracy" in row]
    first, final = evaluations[0], evaluations[-1]
    print("held-out accuracy", first["eval/accuracy"], "->", final["eval/accuracy"], "margin", first["eval/margin"],
          "->", final["eval/margin"])
    assert first["step"] == 0 and first["eval/accuracy"] <= 0.6
    assert final["step"] == 400 and final["eval/accuracy"] > 0.85 and final["eval/margin"] > 1.0, evaluations
    assert final["eval/loss"] < first["eval/loss"] / 2

    # The run-directory contract.
    assert all({"step", "time_s"} <= set(row) for row in rows)
    trained = [row for row in rows if row["step"] > 0]
    assert [row["step"] for row in trained] == list(range(10, 401, 10)) and len(evaluations) == 11
    assert {"losses/reward", "losses/grad_norm", "rewards/accuracy", "rewards/margin", "rewards/chosen",
            "rewards/rejected", "charts/learning_rate", "charts/tokens_per_s", "charts/epoch"} <= set(trained[0])
    assert trained[-1]["rewards/accuracy"] > trained[0]["rewards/accuracy"]
    assert {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "final"} <= {p.name for p in
                                                                                       run.run_dir.iterdir()}

    # final/ is what a later stage (RLHF) loads: the same scores as the model in memory.
    with quiet_transformers():
        reloaded = ScalarHeadModel.from_pretrained(run.run_dir / "final")
    batch = collate_rankings(tokenized(run.tokenizer, [("3+4=", ["7\n", "8\n"]), ("19+19=", ["38\n", "28\n"])]), 0)
    with torch.no_grad():
        torch.testing.assert_close(ranking_rewards(reloaded, batch), ranking_rewards(run.model.eval(), batch))


# -------------------------------------------------------------------------------------------------------- resume


def test_the_centring_term_holds_the_scores_near_0(tmp_path):
    """30 steps at lr 1e-3 on the arithmetic pairs: without the term the held-out scores' level drifts from -1.7 to
    +1.9 (the losses cannot see it), with center_rewards_coefficient 0.1 it ends at 0.01 (measured), and the head's
    bias, frozen without the term, is trained with it."""
    levels, biases = {}, {}
    for coefficient in (0.0, 0.1):
        run = train(quiet(task="arithmetic", task_max_operand=9, task_train_size=40, task_eval_size=10, batch_size=8,
                          max_steps=30, learning_rate=1e-3, eval_every=30, center_rewards_coefficient=coefficient),
                    tmp_path / str(coefficient))
        last = [row for row in metrics(run.run_dir) if "eval/chosen" in row][-1]
        levels[coefficient] = (last["eval/chosen"] + last["eval/rejected"]) / 2
        biases[coefficient] = float(load_file(str(run.run_dir / "final" / "scalar_head.safetensors"))["bias"])
    assert abs(levels[0.0]) > 1.0 and abs(levels[0.1]) < 0.2, levels
    assert biases[0.0] == 0.0 and biases[0.1] != 0.0


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_interruption_is_exact(tmp_path, monkeypatch, lora):
    """Killed right after the second checkpoint and resumed: the same final weights and metrics as an uninterrupted
    run. With LoRA (dropout 0.2, so the restored RNG state matters) checkpoints hold only the adapters and the head,
    and final/ holds the merged body, which ScalarHeadModel.from_pretrained reads."""
    extra = dict(lora_r=4, lora_dropout=0.2) if lora else {}
    config = quiet(task="arithmetic", task_max_operand=9, task_train_size=20, task_eval_size=4, loss="kwise",
                   batch_size=4, gradient_accumulation_steps=2, max_steps=7, checkpoint_every=2, learning_rate=3e-3,
                   **extra)
    reference = train(config, tmp_path / "reference")

    # killed right after the checkpoint of step 4
    train_and_kill_after_second_checkpoint(monkeypatch, train, config, tmp_path / "killed")
    resumed = lm_session.resume(tmp_path / "killed")
    assert resumed.steps == 7

    for name in ("model.safetensors", "scalar_head.safetensors"):
        expected = load_file(str(reference.run_dir / "final" / name))
        actual = load_file(str(resumed.run_dir / "final" / name))
        assert expected.keys() == actual.keys() and not any("lora" in key for key in actual)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key
    def strip(rows):
        return [{k: v for k, v in row.items() if k not in ("time_s", "charts/tokens_per_s")} for row in rows]
    assert strip(metrics(resumed.run_dir)) == strip(metrics(reference.run_dir))

    checkpoint = load_file(str(sorted((tmp_path / "killed" / "checkpoints").glob("step_*"))[-1] /
                               "model.safetensors"))
    if lora:
        assert checkpoint and all("lora_" in key or key == "model.head.weight" for key in checkpoint)
        assert "model.head.weight" in checkpoint
    assert "model.head.bias" not in checkpoint  # the losses are blind to a constant: the bias stays 0
    assert float(load_file(str(resumed.run_dir / "final" / "scalar_head.safetensors"))["bias"]) == 0.0
    with quiet_transformers():
        reloaded = ScalarHeadModel.from_pretrained(resumed.run_dir / "final")
    ids = torch.tensor([resumed.tokenizer.encode("3+4=7\n")])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), resumed.model.eval()(ids))


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_trains_resumes_and_reads_a_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    config_file = tmp_path / "reward.yaml"
    config_file.write_text("task: arithmetic\ntask_max_operand: 9\ntask_train_size: 16\ntask_eval_size: 4\n"
                           "loss: plackett_luce\nbatch_size: 8\nmax_steps: 2\n")
    assert cli.main(["reward", "--config", str(config_file), "--model", "builtin:nano", "--batch-size", "4",
                     "--out", str(out), "--progress", "false", "--tensorboard", "false"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "algorithm: reward" in saved and "loss: plackett_luce" in saved and "batch_size: 4" in saved
    rows = metrics(out)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[0]["eval/accuracy"] is not None  # held-out rankings: accuracy over their 6 pairs each
    assert cli.main(["reward", "--resume", str(out), "--max-steps", "3"]) == 0
    assert [row["step"] for row in metrics(out)] == [0, 1, 2, 3]
    assert cli.main(["dpo", "--resume", str(out)]) == 2
    assert "that run is 'reward'" in capsys.readouterr().err


def one_line_error(capsys):
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("advantage: error:"), error
    return error[0]


@pytest.mark.parametrize("flags,needle", [
    (["--loss", "bt", "--data-kind", "ranking"], "field 'loss'"),
    (["--center-rewards-coefficient", "-0.1"], "field 'center_rewards_coefficient'"),
    (["--ranking-answers", "best_worst"], "field 'ranking_answers'"),
    (["--loss", "hinge"], "loss"),
    (["--lora-r", "2", "--lora-merge", "false"], "lora_merge"),
    (["--batch-size", "6", "--gradient-accumulation-steps", "4"], "must divide"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert cli.main(["reward", "--model", "builtin:nano", "--task", "arithmetic", *flags, "--out", str(out),
                     "--progress", "false"]) == 2
    assert needle in one_line_error(capsys)
    assert not (out / "config.yaml").exists()


def test_a_bad_ranking_row_names_its_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "responses": ["2", "3"]}\n{"prompt": "2+2=", "responses": ["4"]}\n')
    assert cli.main(["reward", "--model", "builtin:nano", "--data", str(data), "--loss", "kwise",
                     "--out", str(tmp_path / "run")]) == 2
    assert f"{data}:2: column 'responses' must be a list of at least 2 strings" in one_line_error(capsys)
