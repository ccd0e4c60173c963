"""Training data in the column conventions TRL users already have, checked before anything trains.

Formats: a JSONL file (`.jsonl`, one JSON object per line, blank lines skipped), a Parquet file (`.parquet`), or a
directory written by `datasets.Dataset.save_to_disk`. Extra columns are allowed and ignored.

Kinds and their columns (a "conversation" is a list of {"role": ..., "content": ...} messages, as in TRL):

    sft          prompt + completion (strings, or conversations with an assistant-only completion),
                 or text alone, or messages (a conversation ending with an assistant reply)
    preference   prompt, chosen, rejected (strings, or a conversation prompt with assistant-only replies);
                 one Bradley-Terry comparison chosen > rejected per row (docs/math.md §5)
    ranking      prompt, responses (a list of at least 2 strings, best first); the K-wise comparisons of
                 InstructGPT's reward model and the Plackett-Luce likelihood (docs/math.md §5)
    prompt       prompt alone (for online RL, where the policy writes the completions)

Every row is checked before any is converted, and the first problem is raised as a one-line UsageError that names
the place and the column: `data/train.jsonl:17: column 'chosen' is empty` (JSONL: 1-based line number) or
`data/train.parquet[16]: column 'chosen' is empty` (Parquet and datasets directories: 0-based row index, the
number `dataset[16]` takes).

Conversion to text: string columns are used as they are (no template is applied to plain text, as in TRL);
conversational columns go through the tokenizer's chat template. The prompt is rendered with the generation prompt
(`add_generation_prompt=True`), and the completion is what the template adds when the reply is appended, so that
prompt + completion is exactly the rendered conversation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advantage.errors import UsageError
from advantage.run.files import atomic_write_text

KINDS = ("sft", "preference", "ranking", "prompt")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Row:
    """One example: its columns, and where it came from for error messages (`file.jsonl:17` or `file.parquet[16]`)."""

    columns: dict[str, Any]
    where: str


def rows_from_records(records: Iterable[Mapping[str, Any]], source: str = "<memory>") -> list[Row]:
    """Rows from in-memory mappings; each is placed at `source[index]` (0-based) in error messages."""
    return [Row(dict(record), f"{source}[{index}]") for index, record in enumerate(records)]


# ---------------------------------------------------------------------------------------------------------- loading


def load_rows(path: str | os.PathLike, kind: str | None = None) -> list[Row]:
    """Read every row of a .jsonl file, a .parquet file or a save_to_disk directory; validate them if `kind` is given.

    With a kind, rows are checked as they are read, so the error is the first problem in file order, whether it is
    a line of broken JSON or a bad column.
    """
    check = _checker(kind) if kind is not None else None
    path_text = str(path)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path_text}: no such file or directory")
    if path.is_dir():
        reader = _read_dataset_directory(path, path_text)
    elif path.suffix == ".jsonl":
        reader = _read_jsonl(path, path_text)
    elif path.suffix == ".parquet":
        reader = _read_parquet(path, path_text)
    else:
        raise UsageError(f"{path_text}: unsupported data format '{path.suffix}' (expected a .jsonl or .parquet "
                         "file, or a directory written by datasets.Dataset.save_to_disk)")
    rows = []
    for row in reader:
        if check is not None:
            check(row)
        rows.append(row)
    if not rows:
        raise UsageError(f"{path_text}: no rows")
    return rows


def _read_jsonl(path: Path, path_text: str) -> Iterator[Row]:
    try:
        stream = path.open("rb")
    except OSError as error:
        raise UsageError(f"{path_text}: cannot read ({error.strerror})") from None
    # Binary lines, decoded one at a time, so that a bad byte is reported with its line number.
    with stream:
        for number, raw in enumerate(stream, start=1):
            where = f"{path_text}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise UsageError(f"{where}: expected a JSON object, got {_json_type(record)}")
            yield Row(record, where)


def _read_parquet(path: Path, path_text: str) -> list[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as error:
        raise UsageError(f"{path_text}: cannot read Parquet ({_one_line(error)})") from None
    return rows_from_records(records, path_text)


def _read_dataset_directory(path: Path, path_text: str) -> list[Row]:
    import datasets  # imported here: it is slow to import and only directories need it

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UsageError(f"{path_text}: a directory, but not one written by datasets.Dataset.save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise UsageError(f"{path_text}: holds splits ({splits}), not one dataset; give one split's directory, "
                         f"e.g. {path_text}/{next(iter(dataset), 'train')}")
    return rows_from_records(dataset.to_list(), path_text)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, as a user who wrote the file would call it."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------------- validation


def validate(rows: Iterable[Row], kind: str) -> None:
    """Check every row for `kind`; raise a UsageError for the first problem (place, column, what is wrong)."""
    check = _checker(kind)
    for row in rows:
        check(row)


def _checker(kind: str) -> Callable[[Row], None]:
    if kind not in KINDS:
        raise UsageError(f"unknown data kind '{kind}' (expected one of {', '.join(KINDS)})")
    return {"sft": _check_sft, "preference": _check_preference, "ranking": _check_ranking,
            "prompt": _check_prompt}[kind]


def _check_sft(row: Row) -> None:
    columns = row.columns
    if "prompt" in columns or "completion" in columns:
        prompt_is_conversation = _check_text_or_conversation(row, "prompt")
        completion_is_conversation = _check_text_or_conversation(row, "completion", only_role="assistant")
        _check_same_form(row, "prompt", prompt_is_conversation, "completion", completion_is_conversation)
    elif "messages" in columns:
        messages = _require(row, "messages")
        if not isinstance(messages, list):
            raise UsageError(f"{row.where}: column 'messages' must be a list of messages, got {_json_type(messages)}")
        _check_messages(row, "messages", messages)
        # The prompt is everything before the last reply; templates cannot render an empty conversation reliably.
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UsageError(f"{row.where}: column 'messages' must end with an assistant reply after at least one "
                             "other message")
    elif "text" in columns:
        _check_text(row, "text")
    else:
        raise UsageError(f"{row.where}: missing column 'prompt' (sft rows need 'prompt' and 'completion', "
                         "or 'text', or 'messages')")


def _check_preference(row: Row) -> None:
    prompt_is_conversation = _check_text_or_conversation(row, "prompt")
    for column in ("chosen", "rejected"):
        reply_is_conversation = _check_text_or_conversation(row, column, only_role="assistant")
        _check_same_form(row, "prompt", prompt_is_conversation, column, reply_is_conversation)


def _check_ranking(row: Row) -> None:
    _check_text_or_conversation(row, "prompt")
    responses = _require(row, "responses")
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"a list of {len(responses)}" if isinstance(responses, list) else _json_type(responses)
        raise UsageError(f"{row.where}: column 'responses' must be a list of at least 2 strings, got {got}")
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise UsageError(f"{row.where}: column 'responses'[{index}] must be a string, "
                             f"got {_json_type(response)}")
        if not response.strip():
            raise UsageError(f"{row.where}: column 'responses'[{index}] is empty")


def _check_prompt(row: Row) -> None:
    _check_text_or_conversation(row, "prompt")


def _require(row: Row, column: str) -> Any:
    if column not in row.columns:
        raise UsageError(f"{row.where}: missing column '{column}'")
    value = row.columns[column]
    if value is None:
        raise UsageError(f"{row.where}: column '{column}' is null")
    return value


def _check_text(row: Row, column: str) -> None:
    value = _require(row, column)
    if not isinstance(value, str):
        raise UsageError(f"{row.where}: column '{column}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise UsageError(f"{row.where}: column '{column}' is empty")


def _check_text_or_conversation(row: Row, column: str, only_role: str | None = None) -> bool:
    """Check a column that is a string or a conversation; return True if it is a conversation."""
    value = _require(row, column)
    if isinstance(value, str):
        _check_text(row, column)
        return False
    if isinstance(value, list):
        _check_messages(row, column, value, only_role)
        return True
    raise UsageError(f"{row.where}: column '{column}' must be a string or a list of messages, "
                     f"got {_json_type(value)}")


def _check_messages(row: Row, column: str, messages: list, only_role: str | None = None) -> None:
    if not messages:
        raise UsageError(f"{row.where}: column '{column}' is empty")
    for index, message in enumerate(messages):
        where = f"{row.where}: column '{column}'[{index}]"
        if not isinstance(message, dict):
            raise UsageError(f"{where} must be a message {{\"role\": ..., \"content\": ...}}, "
                             f"got {_json_type(message)}")
        role = message.get("role")
        if role is None:
            raise UsageError(f"{where} has no 'role'")
        if role not in ROLES:
            raise UsageError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if only_role is not None and role != only_role:
            raise UsageError(f"{where} must be from the {only_role}, got role {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise UsageError(f"{where} 'content' must be a string, got {_json_type(content)}")
        if not content.strip():
            raise UsageError(f"{where} has empty content")


def _check_same_form(row: Row, first: str, first_is_conversation: bool, second: str,
                     second_is_conversation: bool) -> None:
    # A conversation prompt with a plain-text reply (or the reverse) has no single right rendering.
    if first_is_conversation != second_is_conversation:
        form = {True: "a list of messages", False: "a string"}
        raise UsageError(f"{row.where}: column '{second}' is {form[second_is_conversation]} but '{first}' is "
                         f"{form[first_is_conversation]}; give both as strings or both as conversations")


# ------------------------------------------------------------------------------------------------------- conversion


def sft_pairs(rows: Sequence[Row], tokenizer: Any = None) -> list[tuple[str, str]]:
    """(prompt text, completion text) per sft row; `text` rows have the prompt "". Validates all rows first."""
    validate(rows, "sft")
    pairs = []
    for row in rows:
        columns = row.columns
        if "prompt" in columns:
            prompt, completion = columns["prompt"], columns["completion"]
            if isinstance(prompt, str):
                pairs.append((prompt, completion))
            else:
                pairs.append(_split_conversation(row, tokenizer, prompt, completion, "completion"))
        elif "messages" in columns:
            messages = columns["messages"]
            pairs.append(_split_conversation(row, tokenizer, messages[:-1], messages[-1:], "messages"))
        else:
            pairs.append(("", columns["text"]))
    return pairs


def preference_triples(rows: Sequence[Row], tokenizer: Any = None) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts per preference row. Validates all rows first."""
    validate(rows, "preference")
    triples = []
    for row in rows:
        prompt, chosen, rejected = (row.columns[name] for name in ("prompt", "chosen", "rejected"))
        if isinstance(prompt, str):
            triples.append((prompt, chosen, rejected))
        else:
            prompt_text, chosen_text = _split_conversation(row, tokenizer, prompt, chosen, "chosen")
            _, rejected_text = _split_conversation(row, tokenizer, prompt, rejected, "rejected")
            triples.append((prompt_text, chosen_text, rejected_text))
    return triples


def rankings(rows: Sequence[Row], tokenizer: Any = None) -> list[tuple[str, list[str]]]:
    """(prompt, responses best first) per ranking row. Validates all rows first.

    With a conversation prompt, each response is taken as the assistant's reply and rendered by the chat template.
    """
    validate(rows, "ranking")
    result = []
    for row in rows:
        prompt, responses = row.columns["prompt"], row.columns["responses"]
        if isinstance(prompt, str):
            result.append((prompt, list(responses)))
            continue
        prompt_text = ""
        texts = []
        for response in responses:
            reply = [{"role": "assistant", "content": response}]
            prompt_text, text = _split_conversation(row, tokenizer, prompt, reply, "responses")
            texts.append(text)
        result.append((prompt_text, texts))
    return result


def prompts(rows: Sequence[Row], tokenizer: Any = None) -> list[str]:
    """The prompt text of every row (any kind with a `prompt` column). Validates all rows as prompt rows first."""
    validate(rows, "prompt")
    texts = []
    for row in rows:
        prompt = row.columns["prompt"]
        texts.append(prompt if isinstance(prompt, str) else _render(row, tokenizer, prompt, "prompt", True))
    return texts


def _split_conversation(row: Row, tokenizer: Any, prompt_messages: list, reply_messages: list,
                        column: str) -> tuple[str, str]:
    """Render prompt (with generation prompt) and prompt + reply; the completion is the difference."""
    prompt_text = _render(row, tokenizer, prompt_messages, column, add_generation_prompt=True)
    full_text = _render(row, tokenizer, prompt_messages + reply_messages, column, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise UsageError(f"{row.where}: the tokenizer's chat template does not render the prompt as the start of "
                         f"the whole conversation (column '{column}'), so the completion cannot be split off")
    return prompt_text, full_text[len(prompt_text):]


def _render(row: Row, tokenizer: Any, messages: list, column: str, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{row.where}: column '{column}' is a conversation but the tokenizer has no chat template "
                         "(set tokenizer.chat_template, or give the column as plain text)")
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    # Parquet unifies message structs across rows and fills absent keys with None ("tool_calls": None); templates
    # test `is defined`, so absent must stay absent.
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise UsageError(f"{row.where}: the chat template rejected column '{column}' ({_one_line(error)})") from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


# ---------------------------------------------------------------------------------------------------------- writing


def write_jsonl(rows: Iterable[Row | Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write rows (Row objects or mappings) as JSONL, atomically: the file is complete or absent, never half-written."""
    lines = []
    for row in rows:
        record = row.columns if isinstance(row, Row) else dict(row)
        # allow_nan=False: NaN and Infinity are not JSON, and other readers reject them.
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(path, "".join(lines))
