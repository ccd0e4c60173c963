"""The arithmetic task: exact reward, deterministic rows that pass data.py's own checks, ordered rankings."""

import os
import re

import pytest

from advantage.errors import UsageError
from advantage.lm.data import load_rows, preference_triples, rankings, rows_from_records, sft_pairs, validate
from advantage.lm.tasks import ArithmeticTask
from advantage.lm.tasks.arithmetic import answer, answer_is_last_number, reward


@pytest.mark.parametrize("completion, expected", [
    ("81", 1.0),
    (" 81\n", 1.0),  # surrounding whitespace and the newline that ends every answer
    ("81\n99", 1.0),  # only the first line is read
    ("81abc", 1.0),  # decided: text after the number is not judged
    ("81 is the answer", 1.0),
    ("8", 0.0),
    ("", 0.0),
    ("\n81", 1.0),  # leading whitespace, newlines included, is stripped first
    ("810", 0.0),
    ("081", 0.0),  # decided: the canonical form only
    ("81.5", 0.0),  # a different number
    ("+81", 0.0),
    ("eighty-one", 0.0),
])
def test_reward_edge_cases(completion, expected):
    assert reward(["23+58="], [completion]) == [expected]


def test_answers_and_reward_on_wrapped_prompts():
    assert answer("23+58=") == "81"
    assert answer("3-7=") == "-4"
    assert answer("12*11=") == "132"
    # The last question counts, so prompts rendered by a chat template or with few-shot examples work.
    assert answer("1+1=2\n<|user|>40+2=<|end|><|assistant|>") == "42"
    assert reward(["3-7=", "3-7="], ["-4\n", "4\n"]) == [1.0, 0.0]
    with pytest.raises(UsageError, match="no question like '23\\+58='"):
        answer("hello")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(["1+1=", "2+2="], ["2"])


def test_prompts_are_deterministic_distinct_and_in_range():
    task = ArithmeticTask(max_operand=9, operations="+-")
    first = task.prompts(50, seed=3)
    assert first == task.prompts(50, seed=3)
    assert first != task.prompts(50, seed=4)
    assert len(set(first)) == 50
    for prompt in first:
        left, operation, right = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
        assert 0 <= int(left) <= 9 and 0 <= int(right) <= 9
    assert len(set(task.prompts(task.n_questions, seed=0))) == 200  # the whole space, each once
    with pytest.raises(UsageError, match="asked for 201 distinct prompts, but max_operand=9"):
        task.prompts(201, seed=0)


def test_a_smaller_second_operand_gives_every_pair_once_and_only_those():
    task = ArithmeticTask(max_operand=99, max_second_operand=9)
    every = task.prompts(task.n_questions, seed=0)
    pairs = {tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups())) for prompt in every}
    assert task.n_questions == 1000 and pairs == {(a, b) for a in range(100) for b in range(10)}
    assert ArithmeticTask(max_operand=9, max_second_operand=9).prompts(100, 1) == ArithmeticTask(9).prompts(100, 1)
    with pytest.raises(UsageError, match="max_second_operand must be an integer >= 1"):
        ArithmeticTask(max_second_operand=0)


def test_bad_task_settings_are_usage_errors():
    with pytest.raises(UsageError, match="operations must be distinct characters from"):
        ArithmeticTask(operations="/")
    with pytest.raises(UsageError, match="max_operand must be an integer >= 1"):
        ArithmeticTask(max_operand=0)
    with pytest.raises(UsageError, match="a ranking needs k >= 2"):
        ArithmeticTask().ranking_rows(1, k=1, seed=0)


def test_sft_rows_validate_and_are_right():
    rows = ArithmeticTask().sft_rows(20, seed=0)
    pairs = sft_pairs(rows_from_records(rows))
    assert all(completion.endswith("\n") for _, completion in pairs)
    assert reward(*zip(*pairs)) == [1.0] * 20


def test_preference_rows_pair_the_right_answer_with_a_plausible_wrong_one():
    task = ArithmeticTask(operations="+-*")
    rows = task.preference_rows(200, seed=1)
    assert rows == task.preference_rows(200, seed=1)
    triples = preference_triples(rows_from_records(rows))
    prompts, chosen, rejected = zip(*triples)
    assert reward(prompts, chosen) == [1.0] * 200
    assert reward(prompts, rejected) == [0.0] * 200
    for prompt, wrong in zip(prompts, rejected):
        right = int(answer(prompt))
        assert re.fullmatch(r"-?\d+\n", wrong)
        if right >= 0:  # no negative slips on a non-negative answer
            assert int(wrong) >= 0
        # "Plausible": off by 1, 2, 3 or 10, or the same number of digits with one changed.
        changed_digits = sum(a != b for a, b in zip(str(abs(right)), str(abs(int(wrong)))))
        assert abs(int(wrong) - right) in (1, 2, 3, 10) or (
            len(str(abs(int(wrong)))) == len(str(abs(right))) and changed_digits == 1)


@pytest.mark.parametrize("k", [2, 5])
def test_ranking_rows_are_ordered_best_first(k):
    rows = ArithmeticTask(operations="+-").ranking_rows(100, k=k, seed=2)
    for prompt, responses in rankings(rows_from_records(rows)):
        values = [int(response) for response in responses]
        right = int(answer(prompt))
        errors = [abs(value - right) for value in values]
        assert len(values) == k and len(set(values)) == k
        assert errors[0] == 0
        assert errors == sorted(errors) and len(set(errors)) == k  # strictly increasing: no ties
        assert reward([prompt] * k, responses) == [1.0] + [0.0] * (k - 1)


def test_task_files_load_validate_and_keep_train_and_eval_disjoint(tmp_path):
    task = ArithmeticTask(max_operand=9)
    paths = task.write_task_files(tmp_path / "task", n_train=60, n_eval=20, seed=5, ranking_k=3)
    assert sorted(paths) == ["preference_eval", "preference_train", "ranking_eval", "ranking_train", "sft_eval",
                             "sft_train"]
    assert sorted(os.listdir(tmp_path / "task")) == sorted(f"{name}.jsonl" for name in paths)  # no temporaries
    prompt_sets = {}
    for name, path in paths.items():
        kind = name.split("_")[0]
        rows = load_rows(path, kind)
        validate(rows, "prompt")  # every kind also serves as prompts for online RL
        assert len(rows) == (60 if name.endswith("train") else 20)
        prompt_sets[name] = {row.columns["prompt"] for row in rows}
    for kind in ("sft", "preference", "ranking"):
        assert prompt_sets[f"{kind}_train"] == prompt_sets["sft_train"]
        assert prompt_sets[f"{kind}_eval"] == prompt_sets["sft_eval"]
    assert not prompt_sets["sft_train"] & prompt_sets["sft_eval"]
    assert load_rows(paths["ranking_eval"])[0].columns["responses"][0].endswith("\n")

    again = task.write_task_files(tmp_path / "again", n_train=60, n_eval=20, seed=5, ranking_k=3)
    for name in paths:
        assert paths[name].read_bytes() == again[name].read_bytes()  # deterministic for a seed


def test_the_chat_format_asks_as_a_user_and_keeps_the_answer_in_a_column(tmp_path):
    task = ArithmeticTask(max_operand=99, chat=True)
    row = task.sft_rows(1, seed=0)[0]
    question = row["prompt"][0]["content"]
    left, right = (int(number) for number in question.split("?")[0].removeprefix("What is ").split(" + "))
    assert row["prompt"] == [{"role": "user", "content": f"What is {left} + {right}? Answer with the number only."}]
    assert row["completion"] == [{"role": "assistant", "content": str(left + right)}]
    assert row["answer"] == str(left + right)
    pair = task.preference_rows(1, seed=0)[0]
    assert answer_is_last_number([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]], [pair["answer"]] * 2) == \
        [1.0, 0.0]
    paths = task.write_task_files(tmp_path / "chat", n_train=8, n_eval=4, seed=1)
    for name, path in paths.items():
        rows = load_rows(path, name.split("_")[0])
        validate(rows, "prompt")
        assert all(isinstance(r.columns["prompt"], list) and r.columns["answer"].isdigit() for r in rows)


def test_the_last_number_verifier_by_hand():
    completions = ["23 + 58 = 81", "The answer is 81.", "81", "23 + 58 = 80", "23 + 58 =", "", "1,081",
                   [{"role": "assistant", "content": "so 81"}], "3 - 7 = -4"]
    answers = ["81"] * 7 + ["81", "-4"]
    assert answer_is_last_number(["q"] * 9, completions, answers) == [1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert answer_is_last_number(["q"], ["1,081"], ["1081"]) == [1.0]
    with pytest.raises(ValueError, match="1 prompts, 2 completions"):
        answer_is_last_number(["q"], ["1", "2"], ["1", "2"])
