"""Evaluate a language model on held-out prompts: the mean reward of its greedy answers (its accuracy, with a verifier).

    advantage eval models/smollm2 --task arithmetic --task-format chat --task-eval-size 200   # a model, before
    advantage eval runs/smol-grpo                                                             # a run's final/, after

The model is a Hugging Face directory, a .gguf file, or a language-model run directory (its final/ is evaluated, and
the run's config supplies what the flags do not: its task or held-out data, its reward). The prompts are the
held-out ones (`--eval-data`, or a built-in task's eval split); every prompt is answered greedily (the most likely
token at each step, `generation.generate`) with up to `--max-new-tokens` tokens and scored by the reward functions,
a reward model, or the task's verifier (`online.Scorer`). Prints one JSON line:

    {"model": ..., "prompts": 200, "reward": 0.31, "mean_length": 11.2, "examples": [[prompt, answer, reward], ...]}

`reward` is the mean reward; with a 0/1 verifier it is the accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from advantage.errors import UsageError
from advantage.lm.config import mixed_precision
from advantage.lm.generation import greedy_decode
from advantage.lm.loading import end_ids, load_policy, max_length, pad_id
from advantage.lm.models import model_device
from advantage.lm.online import OnlineConfig, Scorer, load_prompts, validate_online
from advantage.lm.session import STAGES
from advantage.run.config import apply_overrides, load_yaml_mapping

ONLINE_FIELDS = {field.name for field in dataclasses.fields(OnlineConfig)}


def eval_config(target: str | Path, fields: dict[str, Any]) -> OnlineConfig:
    """The evaluation's settings: a run directory's config (its model replaced by its final/), then `fields`.

    A built-in `task` among `fields` replaces the run's data files (the task supplies the prompts).

    Raises:
        UsageError: a run directory that is not a language-model run, or has no final/ yet.
    """
    path = Path(target)
    config = OnlineConfig(model=str(target), eval_max_prompts=200)
    if (path / "config.yaml").is_file():
        saved = load_yaml_mapping(path / "config.yaml")
        stage = saved.pop("algorithm", None)
        if stage not in STAGES:
            raise UsageError(f"{path}: a '{stage}' run; language-model evaluation takes a language-model run "
                             f"({', '.join(STAGES)}), a model directory or a .gguf file")
        if stage == "reward":
            raise UsageError(f"{path}: a reward model scores answers but writes none; evaluate a policy")
        if not (path / "final" / "config.json").is_file():
            raise UsageError(f"{path}: the run has not finished (no final/ model)")
        config = apply_overrides(config, {key: value for key, value in saved.items() if key in ONLINE_FIELDS},
                                 str(path / "config.yaml"))
        config = dataclasses.replace(config, model=str(path / "final"))
    if fields.get("task", "none") != "none":
        config = dataclasses.replace(config, data="", eval_data="")
    return apply_overrides(config, fields, "command line")


@torch.no_grad()
def evaluate_model(config: OnlineConfig, shown: int = 3) -> dict[str, Any]:
    """Greedy answers to the held-out prompts of `config`, scored; returns the JSON line's fields (see module doc).

    Raises:
        UsageError: no held-out prompts (neither --eval-data nor a built-in --task), or nothing to score with.
    """
    if config.task == "none":
        if not config.eval_data:
            raise UsageError("field 'eval_data' is required: the held-out prompts (or a built-in --task)")
        config = dataclasses.replace(config, data=config.eval_data)  # the prompts are read as the "training" ones
    validate_online(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_policy(config)
    model.eval()
    ends, pad = end_ids(tokenizer, model), pad_id(tokenizer)
    with tempfile.TemporaryDirectory() as scratch:  # a built-in task's files, read once
        training, held_out = load_prompts(config, Path(scratch), tokenizer, max_length(config, model))
    prompts = (held_out if config.task != "none" else training)[:config.eval_max_prompts or None]
    scorer = Scorer(config, tokenizer, ends, model_device(model))
    with mixed_precision(config):
        generated = greedy_decode(model, [prompt.ids for prompt in prompts], max_new_tokens=config.max_new_tokens,
                                  eos_id=ends, pad_id=pad, cuda_graph=config.cuda_graphs)
    scores, _ = scorer(prompts, generated)
    lengths = [len(completion) for completion in generated.completions]
    examples = [[prompt.text, text, score] for prompt, text, score in
                zip(prompts[:shown], scorer.texts(generated.completions[:shown]), scores.tolist())]
    return {"model": config.model, "prompts": len(prompts), "reward": sum(scores.tolist()) / len(prompts),
            "mean_length": sum(lengths) / len(lengths), "examples": examples}


def main(target: str, fields: dict[str, Any]) -> int:
    """`advantage eval` on a language model: print the JSON line."""
    print(json.dumps(evaluate_model(eval_config(target, fields))))
    return 0
