"""Helpers shared by the language-model stage tests."""

import json

import pytest

from advantage.lm.data import write_jsonl
from advantage.lm.session import LMSession
from advantage.lm.tasks import ArithmeticTask


def small_config(config_class, **fields):
    """A config of `config_class` on the built-in nano model that writes no TensorBoard files and shows no progress."""
    defaults = dict(model="builtin:nano", progress=False, tensorboard=False, seed=1)
    return config_class(**{**defaults, **fields})


def metrics(run_dir):
    """The metrics.jsonl rows of a run."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    """Stands for a kill: raised right after a checkpoint is complete."""


def train_and_kill_after_second_checkpoint(monkeypatch, train, config, run_dir):
    """Run `train(config, run_dir)` and stop it right after its second checkpoint is written, as a kill would."""
    original_save = LMSession.save
    calls = {"n": 0}

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt

    monkeypatch.setattr(LMSession, "save", save_then_die)
    with pytest.raises(Interrupt):
        train(config, run_dir)
    monkeypatch.setattr(LMSession, "save", original_save)


def arithmetic_preferences(sft_run, out, seeds):
    """The arithmetic task's preference pairs for the SFT run's train and held-out prompts, with the wrong answers of
    `seeds` task seeds (several pairs per prompt; the held-out prompts stay disjoint from the training ones)."""
    split = {json.loads(line)["prompt"]: name for name in ("train", "eval")
             for line in (sft_run.run_dir / "data" / f"sft_{name}.jsonl").read_text().splitlines()}
    task = ArithmeticTask(max_operand=sft_run.config.task_max_operand, operations=sft_run.config.task_operations)
    rows = {"train": [], "eval": []}
    for seed in range(seeds):
        for row in task.preference_rows(task.n_questions, seed=seed):
            if row["prompt"] in split:
                rows[split[row["prompt"]]].append(row)
    paths = {name: out / f"preference_{name}.jsonl" for name in rows}
    for name, path in paths.items():
        write_jsonl(rows[name], path)
    return paths["train"], paths["eval"]


def cut_layers(source, out, layers):
    """A copy of the Hugging Face model directory `source` keeping its first `layers` decoder layers (embeddings,
    final norm, head and tokenizer unchanged): a real model's vocabulary, tokenizer and chat template at the cost
    of a small one. Written once: an existing copy at `out` is reused."""
    from advantage.lm.models import load_causal_lm, save_pretrained

    if (out / "config.json").is_file():
        return out
    model, tokenizer = load_causal_lm(source, dtype="float32")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return save_pretrained(model, tokenizer, out)
