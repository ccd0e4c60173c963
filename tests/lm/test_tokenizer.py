"""The character tokenizer: one token per character, exact round trips, chat template, offline reload."""

import json
import string

import pytest

from advantage.errors import UsageError
from advantage.lm.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer, load_tokenizer

TEXTS = ["12+34=46\n", "  two  spaces, a tab\tand\nnew lines \n", "a*b-c=d", string.printable.replace("\r", "")
         .replace("\x0b", "").replace("\x0c", "")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_vocabulary_is_specials_then_every_printable_character(tokenizer):
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 101
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [
        0, 1, 2, 3]
    for character in string.digits + string.ascii_letters + "+-*= \n":
        assert tokenizer.convert_tokens_to_ids(character) != tokenizer.unk_token_id


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_per_character_and_exact_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)  # no BOS added, nothing merged, nothing dropped
    assert ids == [tokenizer.convert_tokens_to_ids(character) for character in text]
    assert tokenizer.decode(ids) == text


def test_unknown_character_and_special_tokens(tokenizer):
    assert tokenizer.encode("é") == [tokenizer.unk_token_id]
    ids = tokenizer.encode("ab<eos>")
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 3
    assert tokenizer.decode([tokenizer.bos_token_id, *tokenizer.encode("1 2"), tokenizer.eos_token_id],
                            skip_special_tokens=True) == "1 2"


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "12+34="},
                {"role": "assistant", "content": "46"}, {"role": "user", "content": "1+1="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "System: add\nUser: 12+34=\nAssistant: 46<eos>User: 1+1=\nAssistant: "
    without_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert without_prompt == "System: add\nUser: 12+34=\n"


def test_save_then_load_round_trips_exactly_even_in_a_qwen2_model_folder(tokenizer, tmp_path):
    # transformers 5.x AutoTokenizer would pick Qwen2Tokenizer for this folder, which drops spaces and newlines.
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    loaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.eos_token_id == tokenizer.eos_token_id
    messages = [{"role": "user", "content": "2*3="}]
    assert (loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "User: 2*3=\nAssistant: ")


def test_missing_or_empty_directory_is_a_usage_error_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(UsageError, match="no_such_tokenizer"):
        load_tokenizer(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty_dir"):
        load_tokenizer(empty)
    broken = tmp_path / "broken_dir"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="broken_dir"):
        load_tokenizer(broken)
