"""On-policy preference pairs: the policy's own answers, judged by a verifier, as DPO or reward-model data.

DPO learns from comparisons of answers to the same prompt (docs/math.md §6). Comparisons of answers the policy
itself writes are the most informative ones for it: for each prompt, sample K answers from the model (the token
MDP sampled, docs/math.md §7b: `generation.generate`), score them with reward functions (`rewards`, e.g. a
verifier that checks the answer column), and keep one pair per prompt whose best answer scored higher than its
worst: chosen = a best-scoring answer, rejected = a worst-scoring one. Prompts whose K answers all scored the same
teach nothing and are left out (counted).

    advantage pairs --model models/smollm2 --task arithmetic --task-format chat --samples-per-prompt 4 \\
        --out data/pairs.jsonl

Rows keep the prompt as the data holds it (a string, or a list of messages) and give the answers in the same form
(strings, or [{"role": "assistant", "content": ...}]), with the data's other columns (e.g. `answer`), so the file is
`preference` data for `advantage dpo` and `advantage reward`. The file is written atomically.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from advantage.errors import UsageError
from advantage.lm.config import mixed_precision
from advantage.lm.data import write_jsonl
from advantage.lm.generation import generate
from advantage.lm.loading import end_ids, load_policy, max_length, pad_id
from advantage.lm.models import model_device
from advantage.lm.online import OnlineConfig, PromptExample, Scorer, load_prompts, validate_online
from advantage.run.config import param, require
from advantage.run.seeding import derive_seed


@dataclass
class PairsConfig(OnlineConfig):
    """What to sample and how to judge it: the online fields (model, data or task, reward, sampling)."""

    samples_per_prompt: int = param(4, "answers sampled per prompt (K); the pair is a best and a worst of them")
    split: str = param("train", "with --task: which prompts, train or eval")
    max_prompts: int = param(0, "prompts sampled, the first ones of the data (0: all)")
    batch_size: int = param(8, "prompts sampled together (memory only)")
    out: str = param("pairs.jsonl", "the JSONL file to write")


def validate(config: PairsConfig) -> None:
    """Reject invalid settings with a one-line error naming the field."""
    validate_online(config)
    require(config.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (a pair needs two answers)",
            config.samples_per_prompt)
    require(config.split in ("train", "eval"), "split", "must be train or eval", config.split)
    require(config.max_prompts >= 0, "max_prompts", "must be >= 0", config.max_prompts)
    require(config.out.endswith(".jsonl"), "out", "must name a .jsonl file", config.out)


def _answer(prompt: PromptExample, text: str):
    """An answer in the form of its prompt: a string, or the assistant's reply as a list of one message."""
    return [{"role": "assistant", "content": text}] if prompt.conversational else text


@torch.no_grad()
def sample_pairs(config: PairsConfig) -> dict[str, float]:
    """Write `config.out`: one (chosen, rejected) row per prompt whose sampled answers did not all score the same.

    Returns:
        {"prompts", "pairs", "mean_reward", "best_reward"}: how many prompts were sampled, how many pairs were kept,
        the mean reward of every sampled answer and the mean of each prompt's best.
    """
    validate(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_policy(config)
    model.eval()
    ends, pad = end_ids(tokenizer, model), pad_id(tokenizer)
    out = Path(config.out)
    with tempfile.TemporaryDirectory() as scratch:  # a built-in task's files, read once
        train_prompts, eval_prompts = load_prompts(config, Path(scratch), tokenizer, max_length(config, model))
    prompts = (eval_prompts if config.split == "eval" else train_prompts)[:config.max_prompts or None]
    if not prompts:
        raise UsageError("field 'split': no eval prompts (give --eval-data, or use --task)")
    scorer = Scorer(config, tokenizer, ends, model_device(model))
    rows, rewards, best = [], [], []
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start:start + config.batch_size]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, offset=start))
        with mixed_precision(config):
            generated = generate(model, [prompt.ids for prompt in chunk], samples_per_prompt=config.samples_per_prompt,
                                 max_new_tokens=config.max_new_tokens, eos_id=ends, pad_id=pad,
                                 temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                 generator=generator, cuda_graph=config.cuda_graphs)
        scores, _ = scorer(chunk, generated)
        texts = scorer.texts(generated.completions)
        group = config.samples_per_prompt
        for index, prompt in enumerate(chunk):
            values = scores[index * group:(index + 1) * group]
            rewards.extend(values.tolist())
            best.append(float(values.max()))
            if math.isclose(float(values.max()), float(values.min())):
                continue
            chosen, rejected = int(values.argmax()), int(values.argmin())  # the first best, the first worst
            rows.append({"prompt": prompt.prompt if prompt.prompt is not None else prompt.text,
                         "chosen": _answer(prompt, texts[index * group + chosen]),
                         "rejected": _answer(prompt, texts[index * group + rejected]), **prompt.columns})
    if not rows:
        raise UsageError(f"no pairs: every prompt's {config.samples_per_prompt} answers scored the same "
                         f"(sample more per prompt, or at a higher temperature)")
    write_jsonl(rows, out)
    summary = {"prompts": len(prompts), "pairs": len(rows), "mean_reward": sum(rewards) / len(rewards),
               "best_reward": sum(best) / len(best)}
    print(json.dumps({"out": str(out), **{key: round(value, 4) for key, value in summary.items()}}))
    return summary
