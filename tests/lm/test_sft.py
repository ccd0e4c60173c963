"""SFT: the loss is maximum likelihood on the completion tokens only; batching, accumulation and packing never change
the gradient; it learns arithmetic; final/ is a plain transformers model; resume is exact; the CLI's contract."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from lm_helpers import metrics, small_config, train_and_kill_after_second_checkpoint
from safetensors.torch import load_file

from advantage import cli
from advantage.errors import NonFiniteLossError, UsageError
from advantage.lm import session as lm_session
from advantage.lm.data import write_jsonl
from advantage.lm.data_order import DataOrder
from advantage.lm.examples import collate_examples, pack_examples, tokenize_pairs
from advantage.lm.generation import greedy_decode
from advantage.lm.loading import load_policy
from advantage.lm.models import build_model
from advantage.lm.schedule import learning_rate_at
from advantage.lm.session import LMSession
from advantage.lm.sft import SFTConfig, accumulate_gradients, completion_nll, train
from advantage.lm.tokenizer import build_char_tokenizer, strip_end_tokens

torch.set_num_threads(1)

# Prompts and completions of very different lengths, so that micro-batches pad differently.
PAIRS = [("12+3=", "15\n"), ("7+80=", "87\n"), ("1=", "a much longer completion\n"), ("what is 99+1? ", "100\n"),
         ("", "a text row: all of it is completion"), ("x", "y"), ("45+45=", "90\n"), ("long prompt " * 3, "ok\n")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_pairs(PAIRS, tokenizer, 64)[0]


def quiet(**fields):
    """A small SFT config on the built-in nano model that writes no TensorBoard files and shows no progress."""
    return small_config(SFTConfig, **fields)


# ------------------------------------------------------------------------------------------------ tokens and masks


def test_prompt_is_masked_and_every_completion_ends_with_eos(tokenizer, examples):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert examples[0].prompt_ids == tokenizer.encode("12+3=") and examples[0].completion_ids == \
        tokenizer.encode("15\n") + [eos]
    assert examples[4].prompt_ids == [bos]  # a text row: the whole text is completion, conditioned on <bos>
    assert all(example.completion_ids[-1] == eos for example in examples)
    # A completion already ending with EOS (a chat template's assistant turn) does not get a second one.
    assert tokenize_pairs([("User: hi\nAssistant: ", "hello<eos>")], tokenizer, 64)[0][0].completion_ids == \
        tokenizer.encode("hello") + [eos]
    cut, count = tokenize_pairs([("12345", "6789")], tokenizer, 7)
    assert count == 1 and cut[0].prompt_ids == tokenizer.encode("12345") and cut[0].completion_ids == \
        tokenizer.encode("67")
    batch = collate_examples(examples[:2], pad=0)
    assert batch.loss_mask.sum() == len(examples[0].completion_ids) + len(examples[1].completion_ids)
    assert not batch.loss_mask[:, :5].any()  # the prompt "12+3=" / "7+80=" is never scored


def test_loss_is_the_token_mean_nll_of_the_completions(tokenizer, examples):
    """Against a slow loop: -1/N sum over completion tokens of log softmax(logits at t - 1)[x_t] (seed 003)."""
    model = build_model("nano", tokenizer=tokenizer, seed=3)
    total, count = 0.0, 0
    with torch.no_grad():
        loss = completion_nll(model, collate_examples(examples, pad=0), sum(len(e.completion_ids) for e in examples))
        for example in examples:
            ids = torch.tensor([example.prompt_ids + example.completion_ids])
            log_probs = torch.log_softmax(model(ids).logits[0], dim=-1)  # (T, V)
            for t in range(len(example.prompt_ids), ids.shape[1]):
                total -= float(log_probs[t - 1, ids[0, t]])
                count += 1
    assert math.isclose(float(loss), total / count, rel_tol=1e-5)


# ------------------------------------------------------------------------------- batching, accumulation, packing


def gradients(tokenizer, examples, micro_batches, pack_length=0):
    model = build_model("nano", tokenizer=tokenizer, seed=3)
    loss, num_tokens, _ = accumulate_gradients(model, examples, micro_batches, pad=0, pack_length=pack_length)
    return loss, num_tokens, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_accumulation_and_packing_give_the_batch_gradient(tokenizer, examples):
    """Batch 8 in 1, 4 or 8 micro-batches, packed or not: the same loss and gradient (float32, atol 1e-6)."""
    reference_loss, reference_tokens, reference = gradients(tokenizer, examples, 1)
    for micro_batches, pack_length in [(4, 0), (8, 0), (1, 64), (2, 40)]:
        loss, num_tokens, grads = gradients(tokenizer, examples, micro_batches, pack_length)
        assert num_tokens == reference_tokens
        assert math.isclose(loss, reference_loss, abs_tol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=0, msg=name)
    assert max(grad.abs().max() for grad in reference.values()) > 1e-2  # a real gradient, not zeros


def test_packed_examples_see_only_themselves(tokenizer, examples):
    model = build_model("nano", tokenizer=tokenizer, seed=3).eval()
    packed = pack_examples(examples, 64, pad=0, dtype=torch.float32)
    assert packed.input_ids.shape[0] < len(examples)  # several examples share a row
    assert packed.real_tokens == sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                       position_ids=packed.position_ids).logits
        alone = torch.cat([model(torch.tensor([e.prompt_ids + e.completion_ids])).logits[0] for e in examples])
    order = [logits[r, s:s + len(e.prompt_ids) + len(e.completion_ids)]
             for r, s, e in _segments(packed, examples)]
    torch.testing.assert_close(torch.cat(order), alone, atol=1e-5, rtol=0)


def _segments(packed, examples):
    """(row, start, example) of every packed example, in order."""
    row, start = 0, 0
    for example in examples:
        size = len(example.prompt_ids) + len(example.completion_ids)
        if start + size > 64:
            row, start = row + 1, 0
        yield row, start, example
        start += size


def test_batch_8x1_equals_2x4_equals_1x8_after_an_optimizer_step(tmp_path):
    """Through the training loop: one AdamW step gives the same parameters for any accumulation, and with gradient
    checkpointing (atol 1e-6): both are memory knobs only.

    Adam's first step is lr * g / (|g| + eps) per entry, so an entry whose gradient is near eps = 1e-8 (some are
    analytically zero, such as the key biases: softmax ignores a constant added to every key) moves by about lr
    times its relative rounding error. lr = 1e-4 keeps that under the tolerance; the gradients themselves are
    compared directly in the test above.
    """
    data = tmp_path / "train.jsonl"
    write_jsonl([{"prompt": p, "completion": c} if p else {"text": c} for p, c in PAIRS], data)
    finals = []
    for accumulation, checkpointing in ((1, False), (4, False), (8, False), (2, True)):
        run = train(quiet(data=str(data), batch_size=8, gradient_accumulation_steps=accumulation, max_steps=1,
                          learning_rate=1e-4, gradient_checkpointing=checkpointing),
                    tmp_path / f"accumulate{accumulation}-{checkpointing}")
        finals.append(load_file(str(run.run_dir / "final" / "model.safetensors")))
    initial = build_model("nano", seed=1).state_dict()
    for name, tensor in finals[0].items():
        assert not torch.equal(tensor, initial[name]), name  # every parameter moved
        for other in finals[1:]:
            torch.testing.assert_close(other[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_data_order_and_learning_rate_are_functions_of_the_step():
    order = DataOrder(10, 4, seed=5)
    stream = [index for step in range(5) for index in order.batch(step)]  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh permutation each epoch
    assert DataOrder(10, 4, seed=5).batch(3) == order.batch(3)
    shards = [DataOrder(10, 4, seed=5, rank=r, world_size=2).batch(3) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(order.batch(3))
    config = SFTConfig(learning_rate=1.0, warmup_steps=2, lr_schedule="linear")
    assert [round(learning_rate_at(config, s, 6), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


# ------------------------------------------------------------------------------------------------------ learning


@pytest.mark.learning
def test_sft_learns_arithmetic_and_final_reloads_in_plain_transformers(tmp_path):
    """One-digit addition, 80 training prompts: greedy exact match on 20 held-out prompts goes from 0 to >= 0.6."""
    from transformers import AutoModelForCausalLM

    config = quiet(task="arithmetic", task_max_operand=9, task_train_size=80, task_eval_size=20,
                   learning_rate=3e-3, batch_size=16, max_steps=300, warmup_steps=10, lr_schedule="cosine",
                   log_every=10, tensorboard=True)
    run = train(config, tmp_path / "sft")
    rows = metrics(run.run_dir)
    evaluations = [row for row in rows if "eval/exact_match" in row]
    assert evaluations[0]["step"] == 0 and evaluations[0]["eval/exact_match"] <= 0.1
    assert evaluations[-1]["step"] == 300 and evaluations[-1]["eval/exact_match"] >= 0.6, evaluations
    assert evaluations[-1]["eval/nll"] < evaluations[0]["eval/nll"] / 5
    print("exact match", evaluations[0]["eval/exact_match"], "->", evaluations[-1]["eval/exact_match"])

    # The run-directory contract.
    assert all({"step", "time_s"} <= set(row) for row in rows)
    trained = [row for row in rows if row["step"] > 0]
    assert [row["step"] for row in trained] == list(range(10, 301, 10))
    assert {"losses/nll", "losses/grad_norm", "charts/learning_rate", "charts/tokens_per_s",
            "charts/completion_tokens", "charts/epoch"} <= set(trained[0])
    assert trained[-1]["losses/nll"] < trained[0]["losses/nll"]
    assert len(evaluations) == 11  # step 0 and every 10% of the run
    files = {path.name for path in run.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "final", "data"} <= files
    assert (run.run_dir / "data" / "sft_train.jsonl").read_text().count("\n") == 80
    assert len(list((run.run_dir / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run.run_dir / "final").iterdir()}

    reloaded = AutoModelForCausalLM.from_pretrained(run.run_dir / "final", local_files_only=True)
    prompts = [run.tokenizer.encode(text) for text in ("3+4=", "9+9=", "0+7=")]
    eos = run.tokenizer.eos_token_id
    in_memory = greedy_decode(run.model.eval(), prompts, max_new_tokens=6, eos_id=eos, pad_id=0).completions
    assert greedy_decode(reloaded, prompts, max_new_tokens=6, eos_id=eos, pad_id=0).completions == in_memory
    assert [run.tokenizer.decode(strip_end_tokens(tokens, (eos,))) for tokens in in_memory] == ["7\n", "18\n", "7\n"]


# -------------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_interruption_is_exact(tmp_path, monkeypatch, lora):
    """Killed right after the second checkpoint and resumed: the same final parameters as an uninterrupted run.
    With LoRA, dropout on the adapters makes the restored RNG state matter."""
    extra = dict(lora_r=4, lora_dropout=0.2) if lora else {}
    config = quiet(task="arithmetic", task_max_operand=9, task_train_size=20, task_eval_size=4, batch_size=4,
                   gradient_accumulation_steps=2, max_steps=7, checkpoint_every=2, learning_rate=3e-3, **extra)
    reference = train(config, tmp_path / "reference")

    # killed right after the checkpoint of step 4
    train_and_kill_after_second_checkpoint(monkeypatch, train, config, tmp_path / "killed")
    assert not (tmp_path / "killed" / "final").exists()
    resumed = lm_session.resume(tmp_path / "killed")
    assert resumed.steps == 7

    expected = load_file(str(reference.run_dir / "final" / "model.safetensors"))
    actual = load_file(str(resumed.run_dir / "final" / "model.safetensors"))
    assert expected.keys() == actual.keys() and not any("lora" in key for key in actual)  # merged: plain weights
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    def strip(rows):
        return [{k: v for k, v in row.items() if k not in ("time_s", "charts/tokens_per_s")} for row in rows]
    assert strip(metrics(resumed.run_dir)) == strip(metrics(reference.run_dir))


def test_lora_trains_only_adapters_and_can_save_them(tmp_path):
    from peft import PeftModel

    run = train(quiet(task="arithmetic", task_max_operand=9, task_train_size=8, task_eval_size=2, batch_size=4,
                      max_steps=2, lora_r=2, lora_merge=False, learning_rate=1e-2), tmp_path / "lora")
    checkpoint = load_file(str(sorted((run.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert checkpoint and all("lora_" in key for key in checkpoint)  # only the adapters are trained and saved
    final = {path.name for path in (run.run_dir / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= final
    base, _ = load_policy(run.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a method transformers 5 deprecates
        loaded = PeftModel.from_pretrained(base, run.run_dir / "final").eval()
    ids = torch.tensor([run.tokenizer.encode("3+4=")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model.eval()(ids).logits)
    assert json.loads((run.run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((run.run_dir / "base_model").absolute())


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_trains_resumes_and_reads_a_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    config_file = tmp_path / "sft.yaml"
    config_file.write_text("task: arithmetic\ntask_max_operand: 9\ntask_train_size: 16\ntask_eval_size: 4\n"
                           "batch_size: 8\nmax_steps: 2\n")
    assert cli.main(["sft", "--config", str(config_file), "--model", "builtin:nano", "--batch-size", "4",
                     "--out", str(out), "--progress", "false", "--tensorboard", "false"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "algorithm: sft" in saved and "batch_size: 4" in saved and "task_train_size: 16" in saved
    assert [row["step"] for row in metrics(out)] == [0, 1, 2]
    assert cli.main(["sft", "--task", "arithmetic", "--model", "builtin:nano", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["sft", "--resume", str(out), "--max-steps", "3"]) == 0  # continue for one more step
    assert [row["step"] for row in metrics(out)] == [0, 1, 2, 3]


def test_a_model_directory_trains_quietly(tmp_path, capsys):
    """Any causal LM saved in Hugging Face format (here a Llama) trains from its directory, without progress bars."""
    from advantage.lm.models import save_pretrained

    tokenizer = build_char_tokenizer()
    save_pretrained(build_model("nano", "llama", tokenizer, seed=4), tokenizer, tmp_path / "my_llama")
    capsys.readouterr()
    assert cli.main(["sft", "--model", str(tmp_path / "my_llama"), "--task", "arithmetic", "--task-max-operand", "9",
                     "--task-train-size", "8", "--task-eval-size", "2", "--batch-size", "4", "--max-steps", "2",
                     "--out", str(tmp_path / "run"), "--progress", "false", "--tensorboard", "false"]) == 0
    assert capsys.readouterr().err == ""
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]


def one_line_error(capsys):
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("advantage: error:"), error
    return error[0]


@pytest.mark.parametrize("flags,needle", [
    (["--model", "/nonexistent/model_dir", "--task", "arithmetic"], "/nonexistent/model_dir"),
    (["--task", "arithmetic", "--learning-rate", "0"], "learning_rate"),
    (["--task", "arithmetic", "--batch-size", "0"], "batch_size"),
    (["--task", "arithmetic", "--batch-size", "6", "--gradient-accumulation-steps", "4"], "must divide"),
    (["--task", "arithmetic", "--model", "builtin:huge"], "huge"),
    (["--task", "arithmetic", "--lora-r", "2", "--lora-target-modules", "no_such_proj"], "lora_target_modules"),
    ([], "data"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert cli.main(["sft", "--model", "builtin:nano", *flags, "--out", str(out), "--progress", "false"]) == 2
    assert needle in one_line_error(capsys)
    assert not (out / "config.yaml").exists()  # nothing that would block a corrected rerun


def test_bad_data_row_stops_the_run_before_training(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2\\n"}\n{"prompt": "2+2="}\n')
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "advantage.cli", "sft", "--model", "builtin:nano", "--data",
                           str(data), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{data}:2: missing column 'completion'" in lines[0], done.stderr
    assert not out.exists()


def test_a_resumed_run_refuses_changed_data(tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl([{"prompt": f"{i}+1=", "completion": f"{i + 1}\n"} for i in range(8)], data)
    lm_session.train("sft", out=tmp_path / "run", model="builtin:nano", data=str(data), batch_size=4, max_steps=2,
                     checkpoint_every=1, progress=False, tensorboard=False)  # the Python API
    write_jsonl([{"prompt": f"{i}+2=", "completion": f"{i + 2}\n"} for i in range(8)], data)
    with pytest.raises(UsageError, match="data .*changed"):
        lm_session.resume(tmp_path / "run", max_steps=3)


def test_too_many_non_finite_losses_stop_the_run(tmp_path):
    session = LMSession("sft", quiet(max_nonfinite=2, task="arithmetic"), tmp_path / "run", resume=False)
    assert session.finite(1.0) and not session.finite(math.nan)
    assert session.finite(0.5)  # a finite loss resets the streak
    assert not session.finite(math.inf)
    with pytest.raises(NonFiniteLossError):
        session.finite(math.nan)
    assert session.skipped_updates == 3
