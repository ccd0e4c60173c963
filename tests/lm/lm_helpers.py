"""Helpers shared by the language-model stage tests."""

import json

import pytest

from advantage.lm.session import LMSession


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
