"""Loading, validating and converting training data: every format, every kind, every malformed case."""

import json
import os

import pytest

from advantage.errors import UsageError
from advantage.lm.data import (
    Row,
    load_rows,
    preference_triples,
    prompts,
    rankings,
    rows_from_records,
    sft_pairs,
    validate,
    write_jsonl,
)

# A template with visible markers, so the tests can see exactly where the prompt ends and the reply begins.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny real PreTrainedTokenizerFast built locally (no download), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


class NoTemplateTokenizer:
    """Duck-typed stand-in for a base-model tokenizer: it has no chat template."""

    chat_template = None


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path, records):
    return write_lines(path, [json.dumps(record) for record in records])


# ------------------------------------------------------------------------------------------------ valid, each kind


def test_sft_string_forms_load_and_convert(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": "2+2=", "completion": "4\n", "id": 7}),  # extra columns are allowed
        "",  # blank lines are skipped
        json.dumps({"text": "a whole document"}),
    ])
    rows = load_rows(path, "sft")
    assert [row.where for row in rows] == [f"{path}:1", f"{path}:3"]
    assert sft_pairs(rows) == [("2+2=", "4\n"), ("", "a whole document")]


def test_sft_conversations_go_through_the_chat_template(tmp_path, tokenizer):
    path = write_records(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, user("hi"), assistant("hello")]},
        {"prompt": [user("2+2=")], "completion": [assistant("4")]},
    ])
    pairs = sft_pairs(load_rows(path, "sft"), tokenizer)
    assert pairs == [
        ("<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>", "hello<|end|>"),
        ("<|user|>2+2=<|end|><|assistant|>", "4<|end|>"),
    ]


def test_multi_turn_messages_train_only_the_last_reply(tokenizer):
    rows = rows_from_records([{"messages": [user("a"), assistant("b"), user("c"), assistant("d")]}])
    prompt, completion = sft_pairs(rows, tokenizer)[0]
    assert prompt == "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>"
    assert completion == "d<|end|>"


def test_preference_strings_and_conversations(tmp_path, tokenizer):
    path = write_records(tmp_path / "pref.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
    ])
    assert preference_triples(load_rows(path, "preference"), tokenizer) == [
        ("Q", "good", "bad"),
        ("<|user|>Q<|end|><|assistant|>", "good<|end|>", "bad<|end|>"),
    ]


def test_rankings_keep_order_and_render_replies_to_conversations(tmp_path, tokenizer):
    path = write_records(tmp_path / "rank.jsonl", [
        {"prompt": "Q", "responses": ["best", "middle", "worst"]},
        {"prompt": [user("Q")], "responses": ["best", "worst"]},
    ])
    assert rankings(load_rows(path, "ranking"), tokenizer) == [
        ("Q", ["best", "middle", "worst"]),
        ("<|user|>Q<|end|><|assistant|>", ["best<|end|>", "worst<|end|>"]),
    ]


def test_prompts_from_prompt_rows(tmp_path, tokenizer):
    path = write_records(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}, {"prompt": [user("hi")]}])
    assert prompts(load_rows(path, "prompt"), tokenizer) == ["1+1=", "<|user|>hi<|end|><|assistant|>"]


# ------------------------------------------------------------------------------------------- Parquet and datasets


def test_parquet_with_conversations_loads_and_converts(tmp_path, tokenizer):
    import pyarrow
    import pyarrow.parquet

    records = [
        {"prompt": [user("Q1")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
        {"prompt": [user("Q2")], "chosen": [assistant("up")], "rejected": [assistant("down")]},
    ]
    path = tmp_path / "pref.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    rows = load_rows(path, "preference")
    assert [row.where for row in rows] == [f"{path}[0]", f"{path}[1]"]
    assert preference_triples(rows, tokenizer)[1] == ("<|user|>Q2<|end|><|assistant|>", "up<|end|>", "down<|end|>")


def test_parquet_fills_absent_message_keys_with_null_and_rendering_drops_them(tmp_path, tokenizer):
    import pyarrow
    import pyarrow.parquet

    # Parquet gives every message struct the union of keys: here "name" becomes None where it was absent.
    records = [{"prompt": [{"role": "user", "content": "Q", "name": "ann"}], "completion": [assistant("A")]},
               {"prompt": [user("Q")], "completion": [assistant("A")]}]
    path = tmp_path / "sft.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    rows = load_rows(path, "sft")
    assert rows[1].columns["prompt"][0]["name"] is None
    assert sft_pairs(rows, tokenizer)[1] == ("<|user|>Q<|end|><|assistant|>", "A<|end|>")


def test_parquet_errors_name_the_row_index(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "rank.parquet"
    table = pyarrow.Table.from_pylist([{"prompt": "Q", "responses": ["a", "b"]},
                                       {"prompt": "Q", "responses": ["a"]}])
    pyarrow.parquet.write_table(table, path)
    with pytest.raises(UsageError) as caught:
        load_rows(path, "ranking")
    assert str(caught.value) == f"{path}[1]: column 'responses' must be a list of at least 2 strings, got a list of 1"


def test_save_to_disk_directory(tmp_path):
    import datasets

    directory = tmp_path / "ranked"
    datasets.Dataset.from_list([{"prompt": "Q", "responses": ["a", "b", "c"]}]).save_to_disk(str(directory))
    rows = load_rows(directory, "ranking")
    assert rows[0].where == f"{directory}[0]"
    assert rankings(rows) == [("Q", ["a", "b", "c"])]

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "Q"}])}).save_to_disk(str(splits))
    with pytest.raises(UsageError,
                       match=r"splits: holds splits \(train\), not one dataset; give one split's directory"):
        load_rows(splits)


def test_unusable_paths(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.jsonl: no such file or directory"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt\nQ\n")
    with pytest.raises(UsageError, match=r"data\.csv: unsupported data format '\.csv'"):
        load_rows(tmp_path / "data.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UsageError, match=r"empty\.jsonl: no rows"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match=r"plain: a directory, but not one written by datasets"):
        load_rows(tmp_path / "plain")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UsageError, match=r"broken\.parquet: cannot read Parquet"):
        load_rows(tmp_path / "broken.parquet")


# ------------------------------------------------------------------------------------------------------ malformed

MALFORMED = [
    # (kind, line 3 of the file, the message after "path:3: ")
    ("sft", '{"prompt": "Q", "completion": "A",}', "invalid JSON (Expecting property name enclosed in double "
                                                  "quotes at column 35)"),
    ("sft", '{"prompt": "Q" "completion": "A"}', "invalid JSON (Expecting ',' delimiter at column 16)"),
    ("sft", '["Q", "A"]', "expected a JSON object, got list"),
    ("sft", '{"prompt": "Q"}', "missing column 'completion'"),
    ("sft", '{"question": "Q"}', "missing column 'prompt' (sft rows need 'prompt' and 'completion', or 'text', "
                                 "or 'messages')"),
    ("sft", '{"prompt": "Q", "completion": "   "}', "column 'completion' is empty"),
    ("sft", '{"text": 5}', "column 'text' must be a string, got number"),
    ("sft", '{"prompt": "Q", "completion": null}', "column 'completion' is null"),
    ("sft", '{"prompt": "Q", "completion": {"a": 1}}', "column 'completion' must be a string or a list of "
                                                        "messages, got object"),
    ("sft", '{"messages": "hi"}', "column 'messages' must be a list of messages, got string"),
    ("sft", '{"messages": []}', "column 'messages' is empty"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}',
     "column 'messages' must end with an assistant reply after at least one other message"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
     "column 'messages'[1] has unknown role 'bot' (expected one of system, user, assistant, tool)"),
    ("sft", '{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "column 'messages'[0] has no 'role'"),
    ("sft", '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]}',
     "column 'messages'[0] has empty content"),
    ("sft", '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]}',
     "column 'messages'[0] 'content' must be a string, got number"),
    ("sft", '{"messages": ["hi", {"role": "assistant", "content": "yo"}]}',
     "column 'messages'[0] must be a message {\"role\": ..., \"content\": ...}, got string"),
    ("sft", '{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "A"}]}',
     "column 'completion'[0] must be from the assistant, got role 'user'"),
    ("sft", '{"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}',
     "column 'completion' is a string but 'prompt' is a list of messages; give both as strings or both as "
     "conversations"),
    ("preference", '{"prompt": "Q", "chosen": "", "rejected": "B"}', "column 'chosen' is empty"),
    ("preference", '{"prompt": "Q", "chosen": "A"}', "missing column 'rejected'"),
    ("preference", '{"prompt": "Q", "chosen": "A", "rejected": ["B"]}',
     "column 'rejected'[0] must be a message {\"role\": ..., \"content\": ...}, got string"),
    ("preference", '{"chosen": "A", "rejected": "B"}', "missing column 'prompt'"),
    ("ranking", '{"prompt": "Q", "responses": "A"}',
     "column 'responses' must be a list of at least 2 strings, got string"),
    ("ranking", '{"prompt": "Q", "responses": ["A"]}',
     "column 'responses' must be a list of at least 2 strings, got a list of 1"),
    ("ranking", '{"prompt": "Q", "responses": ["A", 2]}', "column 'responses'[1] must be a string, got number"),
    ("ranking", '{"prompt": "Q", "responses": ["A", ""]}', "column 'responses'[1] is empty"),
    ("prompt", '{"prompt": ""}', "column 'prompt' is empty"),
    ("prompt", '{"prompt": [{"role": "narrator", "content": "Q"}]}',
     "column 'prompt'[0] has unknown role 'narrator' (expected one of system, user, assistant, tool)"),
]

GOOD_LINE = {
    "sft": '{"prompt": "Q", "completion": "A"}',
    "preference": '{"prompt": "Q", "chosen": "A", "rejected": "B"}',
    "ranking": '{"prompt": "Q", "responses": ["A", "B"]}',
    "prompt": '{"prompt": "Q"}',
}


@pytest.mark.parametrize("kind, bad_line, message", MALFORMED)
def test_malformed_rows_name_file_line_and_column(tmp_path, kind, bad_line, message):
    # Line 1 good, line 2 blank (still counted), line 3 bad, line 4 also bad: the first problem is reported.
    path = write_lines(tmp_path / "data.jsonl", [GOOD_LINE[kind], "", bad_line, "{broken"])
    with pytest.raises(UsageError) as caught:
        load_rows(path, kind)
    assert str(caught.value) == f"{path}:3: {message}"
    assert "\n" not in str(caught.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "Q"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UsageError, match=r"data\.jsonl:2: not valid UTF-8"):
        load_rows(path)


def test_validation_checks_every_row_before_converting():
    rows = rows_from_records([{"prompt": "Q", "completion": "A"}] * 3 + [{"prompt": "Q"}], source="mine")
    with pytest.raises(UsageError, match=r"^mine\[3\]: missing column 'completion'$"):
        sft_pairs(rows)
    with pytest.raises(UsageError, match=r"unknown data kind 'dpo' \(expected one of sft, preference, ranking"):
        validate(rows, "dpo")


# -------------------------------------------------------------------------------------------------- chat template


def test_conversation_without_a_chat_template_is_a_usage_error():
    rows = rows_from_records([{"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [assistant("B")]}])
    for tokenizer in (NoTemplateTokenizer(), None):
        with pytest.raises(UsageError) as caught:
            preference_triples(rows, tokenizer)
        assert str(caught.value) == ("<memory>[0]: column 'chosen' is a conversation but the tokenizer has no chat "
                                     "template (set tokenizer.chat_template, or give the column as plain text)")
    # Plain-text data needs no template at all.
    assert preference_triples(rows_from_records([{"prompt": "Q", "chosen": "A", "rejected": "B"}]),
                              NoTemplateTokenizer()) == [("Q", "A", "B")]


def test_template_errors_become_usage_errors(tokenizer, monkeypatch):
    rows = rows_from_records([{"prompt": [user("Q")]}])
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(UsageError, match=r"<memory>\[0\]: the chat template rejected column 'prompt' "
                                         r"\(Conversation roles must alternate\)"):
        prompts(rows, tokenizer)


def test_template_that_rewrites_history_cannot_split_a_completion(monkeypatch, tokenizer):
    # This template prints the generation prompt differently from a finished assistant turn.
    monkeypatch.setattr(tokenizer, "chat_template",
                        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<start reply>{% endif %}")
    rows = rows_from_records([{"prompt": [user("Q")], "completion": [assistant("A")]}])
    with pytest.raises(UsageError, match=r"does not render the prompt as the start of the whole conversation"):
        sft_pairs(rows, tokenizer)


# ---------------------------------------------------------------------------------------------------------- write


def test_write_jsonl_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    records = [{"prompt": "héllo", "completion": "A\n"}, {"prompt": "Q", "completion": "B"}]
    write_jsonl([records[0], Row(records[1], "x:1")], path)
    assert os.listdir(path.parent) == ["rows.jsonl"]
    assert [row.columns for row in load_rows(path, "sft")] == records
    assert "héllo" in path.read_text(encoding="utf-8")  # readable UTF-8, not \\u escapes


def test_failed_write_keeps_the_old_file_and_no_temporary_file(tmp_path):
    path = write_records(tmp_path / "rows.jsonl", [{"prompt": "old"}])
    before = path.read_text()
    with pytest.raises(TypeError):
        write_jsonl([{"prompt": "new"}, {"prompt": object()}], path)  # not JSON-serialisable
    with pytest.raises(ValueError):
        write_jsonl([{"score": float("nan")}], path)  # NaN is not JSON
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_crash_while_writing_keeps_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = write_records(tmp_path / "rows.jsonl", [{"prompt": "old"}])
    before = path.read_text()

    def crash(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # fails after the temporary file is written, before the rename
    with pytest.raises(OSError, match="disk full"):
        write_jsonl([{"prompt": "new"}], path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["rows.jsonl"]
