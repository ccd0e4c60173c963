"""Fixtures of the language-model tests."""

import pytest

from advantage.lm.sft import SFTConfig
from advantage.lm.sft import train as train_sft


@pytest.fixture(scope="session")
def arithmetic_sft(tmp_path_factory):
    """The tiny model after 150 SFT steps on one-digit addition (held-out greedy accuracy about 0.3): the common
    start of the GRPO and RLHF learning tests, trained once."""
    return train_sft(SFTConfig(model="builtin:tiny", task="arithmetic", task_max_operand=9, task_train_size=80,
                               task_eval_size=20, learning_rate=3e-3, batch_size=16, max_steps=150, warmup_steps=5,
                               lr_schedule="cosine", eval_every=150, progress=False, tensorboard=False, seed=1),
                     tmp_path_factory.mktemp("arithmetic") / "sft")
