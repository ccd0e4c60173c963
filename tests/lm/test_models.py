"""Model factory, offline loading, atomic Hugging Face saving, and the scalar-head (reward / value) model."""

import json

import pytest
import torch

from advantage.errors import UsageError
from advantage.lm.logprobs import collate
from advantage.lm.models import ScalarHeadModel, build_model, load_causal_lm, save_pretrained
from advantage.lm.tokenizer import build_char_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def nano(tokenizer):
    return build_model("nano", "qwen2", tokenizer, seed=3).eval()


def test_small_qwen2_is_the_peer_benchmark_model(tokenizer):
    model = build_model("small", "qwen2", tokenizer)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.max_position_embeddings) == (256, 4, 4, 1024, 256)
    assert config.vocab_size == len(tokenizer) == 101
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert sum(p.numel() for p in model.parameters()) == 4_225_536
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 2, 3)
    assert model.generation_config.eos_token_id == 3 and model.generation_config.pad_token_id == 0


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_build_model_is_seeded_and_leaves_the_global_rng_alone(tokenizer, architecture):
    state = torch.random.get_rng_state()
    first, again = (build_model("nano", architecture, tokenizer, seed=7) for _ in range(2))
    other = build_model("nano", architecture, tokenizer, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert type(first).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[architecture]
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.get_input_embeddings().weight, other.get_input_embeddings().weight)


def test_config_overrides_and_usage_errors(tokenizer):
    assert build_model("nano", "llama", tokenizer, num_hidden_layers=1).config.num_hidden_layers == 1
    with pytest.raises(UsageError, match="nano, tiny, small"):
        build_model("huge")
    with pytest.raises(UsageError, match="qwen2, llama"):
        build_model("nano", "gpt5")
    with pytest.raises(UsageError, match="num_hiden_layers"):
        build_model("nano", num_hiden_layers=1)


def test_saved_causal_lm_reloads_in_plain_transformers_and_generates_the_same_tokens(nano, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor([tokenizer.encode("12+34=")])
    before = nano.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    directory = save_pretrained(nano, tokenizer, tmp_path / "model")
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    after = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(before, after) and after.shape[1] > prompt.shape[1]
    model, loaded_tokenizer = load_causal_lm(directory)
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, nano(prompt).logits)
    assert loaded_tokenizer.decode(loaded_tokenizer.encode("1 + 2 =\n3")) == "1 + 2 =\n3"
    assert load_causal_lm(directory, dtype="bfloat16")[0].dtype == torch.bfloat16


def test_save_is_atomic_replacing_a_complete_directory_or_nothing(nano, tokenizer, tmp_path):
    target = tmp_path / "model"
    save_pretrained(nano, tokenizer, target)
    save_pretrained(nano, None, target)  # overwrite: the old tokenizer files go with the old directory
    assert not (target / "tokenizer.json").exists() and (target / "config.json").is_file()

    class FailingTokenizer:
        def save_pretrained(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(nano, FailingTokenizer(), target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no temporary sibling left behind
    assert (target / "model.safetensors").is_file()  # the previous complete save is untouched


def test_load_causal_lm_usage_errors_name_the_directory(tmp_path):
    with pytest.raises(UsageError, match="missing_model"):
        load_causal_lm(tmp_path / "missing_model")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(UsageError, match="no_config.*config.json"):
        load_causal_lm(tmp_path / "no_config")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(UsageError, match="broken_model"):
        load_causal_lm(broken)
    with pytest.raises(UsageError, match="dtype"):
        load_causal_lm(broken, dtype="float8")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_score_last_token_reads_the_last_real_token_whatever_the_padding(nano, padding_side):
    scorer = ScalarHeadModel.from_causal_lm(nano, seed=0).eval()
    prompts, completions = [[5, 6, 7], [8], [9, 10, 11, 12, 13]], [[20, 21], [22, 23, 24, 25], []]
    batch = collate(prompts, completions, pad_id=0, padding_side=padding_side)
    with torch.no_grad():
        per_token = scorer(batch.input_ids, batch.attention_mask)
        scores = scorer.score_last_token(batch.input_ids, batch.attention_mask)
        assert per_token.shape == batch.input_ids.shape and scores.shape == (3,)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            alone = torch.tensor([prompt + completion])
            expected = scorer(alone)[0, -1]
            assert torch.isclose(scores[row], expected, atol=1e-5)
            assert torch.isclose(scorer.score_last_token(alone, torch.ones_like(alone))[0], expected)


def test_scalar_head_model_saves_and_reloads_identically(nano, tokenizer, tmp_path):
    scorer = ScalarHeadModel.from_causal_lm(nano, seed=5)
    assert all(a is not b for a, b in zip(scorer.body.parameters(), nano.base_model.parameters()))  # a copy
    with torch.no_grad():
        scorer.head.bias.fill_(0.25)  # a trained-looking head: not the initialisation the loader would redo
    directory = scorer.save_pretrained(tmp_path / "reward_model", tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "scalar_head.safetensors", "scalar_head.json",
            "tokenizer.json"} <= {path.name for path in directory.iterdir()}
    reloaded = ScalarHeadModel.from_pretrained(directory)
    ids = torch.tensor([tokenizer.encode("2*3=6\n"), tokenizer.encode("7-5=2\n")])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), scorer.eval()(ids))
    assert not reloaded.training


def test_scalar_head_usage_errors(nano, tokenizer, tmp_path):
    save_pretrained(nano, tokenizer, tmp_path / "causal_lm")
    with pytest.raises(UsageError, match="no scalar head"):
        ScalarHeadModel.from_pretrained(tmp_path / "causal_lm")
    with pytest.raises(UsageError, match="missing_scorer"):
        ScalarHeadModel.from_pretrained(tmp_path / "missing_scorer")
