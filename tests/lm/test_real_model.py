"""A real chat model through every stage: SmolLM2-135M-Instruct's own tokenizer, ChatML template and weights.

What a real tokenizer exposes and a character tokenizer hides: the template's end of turn followed by a newline
(exactly one end token per answer, read by the reward model where it was trained to score), several end tokens,
reward functions that read the data's other columns, a GGUF file as --model, and the whole model for one step of
every stage. The fixtures (tests/lm/conftest.py) make the model directory once per machine.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from lm_helpers import metrics
from torch import nn

from advantage import cli
from advantage.lm.data import preference_triples, rankings, rows_from_records, sft_pairs
from advantage.lm.examples import tokenize_pairs
from advantage.lm.generation import generate
from advantage.lm.loading import end_ids, pad_id
from advantage.lm.logprobs import collate_shared_prompt
from advantage.lm.models import ScalarHeadModel, load_causal_lm
from advantage.lm.online import OnlineConfig, PromptExample, Scorer
from advantage.lm.preferences import collate_rankings, tokenize_rankings
from advantage.lm.reward import ranking_rewards
from advantage.lm.rewards import RewardFunction
from advantage.lm.tokenizer import end_token_ids

torch.set_num_threads(1)
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def cut(smollm2_cut):
    """(model, tokenizer, end ids, <|im_end|> id) of the two-layer SmolLM2."""
    model, tokenizer = load_causal_lm(smollm2_cut)
    return model, tokenizer, end_ids(tokenizer, model), tokenizer.convert_tokens_to_ids("<|im_end|>")


def reply(text):
    return [{"role": "assistant", "content": text}]


def encoded(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ one end of turn per answer


def test_the_template_writes_a_newline_after_the_end_of_turn(cut):
    model, tokenizer, ends, im_end = cut
    assert ends == (im_end,) and tokenizer.eos_token == "<|im_end|>"
    prompt, completion = sft_pairs(rows_from_records([{"prompt": QUESTION, "completion": reply("4")}]), tokenizer)[0]
    assert prompt.endswith("<|im_start|>assistant\n") and completion == "4<|im_end|>\n"


@pytest.mark.parametrize("record, answer", [
    ({"prompt": QUESTION, "completion": reply("4")}, "4"),  # conversational prompt + completion
    ({"messages": QUESTION + reply("Four.")}, "Four."),  # a conversation ending with the reply
    ({"prompt": "What is 2 + 2? ", "completion": "4\n"}, "4\n"),  # plain text: the EOS is appended
    ({"prompt": "What is 2 + 2? ", "completion": "4<|im_end|>"}, "4"),  # plain text that ends its own turn
])
def test_sft_and_ptx_answers_end_with_exactly_one_end_of_turn(cut, record, answer):
    model, tokenizer, ends, im_end = cut
    example = tokenize_pairs(sft_pairs(rows_from_records([record]), tokenizer), tokenizer, 512, ends)[0][0]
    assert example.completion_ids == encoded(tokenizer, answer) + [im_end]
    assert example.completion_ids.count(im_end) == 1


def test_reward_and_dpo_answers_end_with_exactly_one_end_of_turn(cut):
    model, tokenizer, ends, im_end = cut
    pairs = rows_from_records([{"prompt": QUESTION, "chosen": reply("4"), "rejected": reply("5")}])
    ranked = rows_from_records([{"prompt": QUESTION, "responses": ["4", "5", "22"]}])
    assert preference_triples(pairs, tokenizer)[0][1] == "4<|im_end|>\n"
    assert rankings(ranked, tokenizer)[0][1][2] == "22<|im_end|>\n"
    for rows, kind, answers in [(pairs, "preference", ["4", "5"]), (ranked, "ranking", ["4", "5", "22"])]:
        example = tokenize_rankings(rows, kind, tokenizer, 512, "training", ends)[0]
        assert example.completion_ids == [encoded(tokenizer, answer) + [im_end] for answer in answers]


class Scripted(nn.Module):
    """A causal LM that writes `script`, one token per forward call, whatever the input (a policy whose answer is
    known in advance); its key-value cache and outputs are the real model's, its next-token logits replaced."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.script, self.calls = model, script, 0
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, input_ids, cache=None, **kwargs):
        output = self.model(input_ids=input_ids, cache=cache, **kwargs)
        logits = torch.full_like(output.logits, -1e4)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        output.logits = logits
        return output


def test_a_sampled_answer_is_scored_where_the_reward_model_was_trained_to_score(cut, tmp_path):
    model, tokenizer, ends, im_end = cut
    pad = pad_id(tokenizer)
    example = tokenize_rankings(rows_from_records([{"prompt": QUESTION, "chosen": reply("4"),
                                                    "rejected": reply("5")}]), "preference", tokenizer, 512,
                                "training", ends)[0]
    # The policy writes "4", its end of turn, then would go on with the template's newline: generation stops first.
    newline = encoded(tokenizer, "\n")
    policy = Scripted(model, encoded(tokenizer, "4") + [im_end] + newline * 4)
    generated = generate(policy, [example.prompt_ids], max_new_tokens=8, eos_id=ends, pad_id=pad, greedy=True)
    assert generated.completions == [example.completion_ids[0]]  # the same ids: the same last position

    reward_model = ScalarHeadModel.from_causal_lm(model, seed=3).eval()
    reward_model.save_pretrained(tmp_path / "reward", tokenizer)
    with torch.no_grad():
        trained = ranking_rewards(reward_model, collate_rankings([example], pad))[0, 0]
    scorer = Scorer(OnlineConfig(reward_model=str(tmp_path / "reward")), tokenizer, ends)
    prompt = PromptExample("", example.prompt_ids, QUESTION)
    scored, _ = scorer([prompt], generated)
    assert torch.allclose(scored[0], trained, atol=1e-5)
    # Read one token later (the old appended EOS after the newline) the score would differ: the position matters.
    later = collate_shared_prompt([example.prompt_ids], [[example.completion_ids[0] + newline + [im_end]]], pad)
    with torch.no_grad():
        assert not torch.allclose(reward_model.score_answers(later)[0], trained, atol=1e-3)


# ------------------------------------------------------------------------------------------------- every end token


def test_generation_stops_on_every_end_token_of_the_generation_config(cut):
    model, tokenizer, _, im_end = cut
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [end_of_text, im_end]  # a list, as Llama 3 and Qwen2.5 ship it
    try:
        ends = end_ids(tokenizer, model)
    finally:
        model.generation_config.eos_token_id = im_end
    assert ends == (im_end, end_of_text)
    four = encoded(tokenizer, "4")
    for stop in ends:
        policy = Scripted(model, four + [stop] + four * 4)
        generated = generate(policy, [encoded(tokenizer, "2+2=")], max_new_tokens=6, eos_id=ends, pad_id=0,
                             greedy=True)
        assert generated.completions == [four + [stop]]
    # And a completion in the data that ends with either is ended there, not given another end token.
    examples, _ = tokenize_pairs([("2+2=", "4<|endoftext|>")], tokenizer, 64, ends)
    assert examples[0].completion_ids == four + [end_of_text]


def test_end_token_ids_reads_lists_and_puts_the_tokenizer_eos_first(cut):
    _, tokenizer, _, im_end = cut

    class Config:
        eos_token_id = [0, im_end, 5]

    assert end_token_ids(tokenizer, Config()) == (im_end, 0, 5)
    assert end_token_ids(tokenizer) == (im_end,)


# ------------------------------------------------------------------------------ reward functions as TRL users write


def test_reward_functions_get_the_data_columns_and_may_return_numpy_or_torch_numbers():
    seen = {}

    def correct(prompts, completions, answer, **kwargs):
        seen.update(answer=answer, keys=sorted(kwargs))
        return np.array([c == a for c, a in zip(completions, answer)], dtype=np.float32)

    def named_only(prompts, completions, answer):
        return [np.int64(len(a)) for a in answer]

    def positional(prompts, completions):
        return torch.tensor([0.5, 1.5])

    def tensors(prompts, completions):
        return [torch.tensor(1.0), np.float64(2.0)]

    columns = {"answer": ["4", "9"], "level": [1, 2], "completion_ids": [[1], [2]]}
    assert RewardFunction("correct", correct)(["2+2", "3*3"], ["4", "8"], **columns).tolist() == [1.0, 0.0]
    assert seen == {"answer": ["4", "9"], "keys": ["completion_ids", "level"]}
    assert RewardFunction("named", named_only)(["a", "b"], ["c", "d"], **columns).tolist() == [1.0, 1.0]
    assert RewardFunction("positional", positional)(["a", "b"], ["c", "d"], **columns).tolist() == [0.5, 1.5]
    assert RewardFunction("tensors", tensors)(["a", "b"], ["c", "d"]).tolist() == [1.0, 2.0]


REWARD_MODULE = '''
import json, os

def correct(prompts, completions, answer, **kwargs):
    """1 when the reply's content is the answer column's value; records what it was given."""
    with open(os.environ["SEEN_FILE"], "a") as seen:
        seen.write(json.dumps({"prompts": prompts, "completions": completions, "answer": answer,
                               "keys": sorted(kwargs)}) + "\\n")
    return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]
'''


def test_grpo_passes_conversations_and_columns_to_reward_functions(smollm2_cut, tmp_path, monkeypatch):
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b), "level": a}
            for a, b in [(2, 3), (4, 1)]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    monkeypatch.setenv("SEEN_FILE", str(tmp_path / "seen.jsonl"))
    assert cli.main(["grpo", "--model", str(smollm2_cut), "--data", str(tmp_path / "prompts.jsonl"),
                     "--reward-functions", f"{tmp_path / 'rewards.py'}:correct", "--group-size", "2",
                     "--batch-size", "2", "--max-new-tokens", "3", "--max-steps", "1", "--progress", "false",
                     "--tensorboard", "false", "--out", str(tmp_path / "run")]) == 0
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 1 and seen[0]["keys"] == ["completion_ids", "level"]
    assert sorted(seen[0]["answer"]) == ["5", "5", "5", "5"]  # each prompt's column, once per completion
    assert all(prompt[-1]["role"] == "user" for prompt in seen[0]["prompts"])  # messages, as the data holds them
    assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in seen[0]["completions"])
    assert "rewards/" + f"{tmp_path / 'rewards.py'}:correct" in metrics(tmp_path / "run")[-1]


# ------------------------------------------------------------------------------ the whole model, and a GGUF file


@pytest.mark.slow
def test_the_whole_model_trains_sft_from_its_gguf_file_and_rlhf_with_ptx(smollm2, smollm2_gguf, tmp_path, capsys):
    """CI's one pass of the full 135M-parameter model through the stages the README replay does not run on it: SFT
    from the GGUF file itself, and RLHF (with PPO-ptx) against a reward model trained here, one optimizer step each
    on conversational data; every final/ is a Hugging Face directory transformers loads. (GRPO, DPO, SFT and the
    reward model on this model with LoRA are steps of the README's "Aligning a real chat model on a laptop", which
    tests/test_readme.py replays.)"""
    from transformers import AutoModelForCausalLM

    questions = [(a, b) for a in (2, 3) for b in (4, 5)]
    data = {
        "sft": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "completion": reply(str(a + b))}
                for a, b in questions],
        "prefs": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "chosen": reply(str(a + b)),
                   "rejected": reply(str(a + b + 1))} for a, b in questions],
        "prompts": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
                    for a, b in questions],
    }
    for name, rows in data.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # LoRA everywhere keeps the checkpoints small (full fine-tuning is the other tests' job); final/ is merged.
    common = ["--batch-size", "2", "--max-steps", "1", "--lora-r", "4", "--progress", "false", "--tensorboard",
              "false"]
    runs = {
        "sft": ["sft", "--model", str(smollm2_gguf), "--data", str(tmp_path / "sft.jsonl")],
        "reward": ["reward", "--model", str(smollm2), "--data", str(tmp_path / "prefs.jsonl")],
        "rlhf": ["rlhf", "--model", str(smollm2), "--data", str(tmp_path / "prompts.jsonl"), "--reward-model",
                 str(tmp_path / "reward" / "final"), "--max-new-tokens", "4", "--update-epochs", "1", "--ptx-coef",
                 "0.5", "--ptx-data", str(tmp_path / "sft.jsonl"), "--ptx-batch-size", "2"],
    }
    for stage, arguments in runs.items():
        assert cli.main([*arguments, *common, "--out", str(tmp_path / stage)]) == 0, stage
        assert metrics(tmp_path / stage)[-1]["step"] == 1
        assert capsys.readouterr().err == "", stage  # no progress bar of transformers' own with --progress false
        final = tmp_path / stage / "final"
        if stage == "reward":
            assert (final / "scalar_head.safetensors").is_file()
            continue  # rlhf reads it
        model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
        capsys.readouterr()  # this test's own loading may draw transformers' bar; the stages' output was checked
        assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
        assert "<|im_start|>" in (final / "chat_template.jinja").read_text()
        # Each run directory holds 0.5 GB (RLHF's 2.6 GB: its value model is trained in full, with Adam's moments
        # in the checkpoint); freed at once, so that the test never holds more than two.
        shutil.rmtree(tmp_path / stage)
