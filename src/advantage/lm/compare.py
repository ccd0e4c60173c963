"""Aligned policies side by side: accuracy, reward-model score and KL to the reference on held-out prompts.

What the demo (and anyone choosing between RLHF, DPO and GRPO) wants to know about each policy:

- greedy accuracy: the task's exact-match reward of the most likely answer;
- sampled accuracy and reward-model score: the same reward, and the reward model's score, averaged over answers
  sampled at temperature 1 (what the online stages optimise);
- KL to the reference per answer, KL(pi || pi_ref) = E_{y ~ pi}[sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]
  (the k1 estimator of docs/math.md §4 summed over the answer's tokens; the KL-regularised objective of §6): how far
  alignment moved the policy from where it started;
- a few greedy completions, to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advantage.lm.examples import encode_prompt
from advantage.lm.generation import generate, greedy_decode
from advantage.lm.loading import end_ids, pad_id
from advantage.lm.logprobs import answer_sequence_log_probs, collate_shared_prompt
from advantage.lm.online import BUILTIN_TASK_REWARD, groups_of
from advantage.lm.rewards import combined_rewards, reward_functions
from advantage.lm.session import quiet_transformers
from advantage.lm.tokenizer import strip_end_tokens


@dataclass
class PolicyFigures:
    """The figures of one policy on the held-out prompts (see the module docstring)."""

    name: str
    greedy_accuracy: float
    sampled_accuracy: float
    reward_model_score: float | None
    kl_to_reference: float
    mean_answer_tokens: float
    completions: list[str] = field(default_factory=list)


def _decode(tokenizer, completion: Sequence[int], ends: Sequence[int]) -> str:
    return tokenizer.decode(strip_end_tokens(completion, ends), skip_special_tokens=True)


@torch.no_grad()
def compare_policies(policies: dict[str, str | Path], reference: str | Path, prompts: Sequence[str], *,
                     reward_model: str | Path | None = None, samples_per_prompt: int = 8, max_new_tokens: int = 4,
                     seed: int = 0, shown: int = 0) -> list[PolicyFigures]:
    """Evaluate every policy directory of `policies` (name -> Hugging Face directory) on the arithmetic prompts.

    Args:
        reference: the starting model the KL is measured to (the SFT model).
        prompts: held-out prompt texts of the built-in arithmetic task (its exact-match reward scores them).
        reward_model: a reward model directory (`advantage reward`), scored on the sampled answers if given.
        samples_per_prompt: answers sampled per prompt for the sampled figures and the KL.
        seed: seed of the sampling (the same for every policy, so they are compared on equal terms).
        shown: how many greedy completions (of the first prompts) to keep for reading.
    """
    from advantage.lm.models import ScalarHeadModel, load_causal_lm

    with quiet_transformers():
        reference_model, tokenizer = load_causal_lm(str(reference))
        scorer = ScalarHeadModel.from_pretrained(reward_model) if reward_model else None
    exact_match = reward_functions(BUILTIN_TASK_REWARD)
    ends, pad = end_ids(tokenizer, reference_model), pad_id(tokenizer)
    prompt_ids = [encode_prompt(tokenizer, text) for text in prompts]
    repeated = [text for text in prompts for _ in range(samples_per_prompt)]
    results = []
    for name, directory in policies.items():
        with quiet_transformers():
            model = reference_model if Path(directory) == Path(reference) else load_causal_lm(str(directory))[0]
        greedy = greedy_decode(model, prompt_ids, max_new_tokens=max_new_tokens, eos_id=ends, pad_id=pad,
                               batch_size=len(prompt_ids))
        greedy_texts = [_decode(tokenizer, c, ends) for c in greedy.completions]
        sampled = generate(model, prompt_ids, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                           eos_id=ends, pad_id=pad, generator=torch.Generator().manual_seed(seed))
        sampled_texts = [_decode(tokenizer, c, ends) for c in sampled.completions]
        batch = collate_shared_prompt(prompt_ids, groups_of(sampled.completions, samples_per_prompt), pad)
        # log pi of each sampled answer is what the sampler recorded (temperature 1, no filtering); log pi_ref is
        # one forward pass of the reference over the same answers.
        policy_log_probs = sampled.sampled_log_probs.sum(dim=1)
        reference_log_probs = answer_sequence_log_probs(reference_model, batch).reshape(-1)
        score = float(scorer.score_answers(batch).float().mean()) if scorer is not None else None
        results.append(PolicyFigures(
            name=name,
            greedy_accuracy=float(combined_rewards(exact_match, list(prompts), greedy_texts)[0].mean()),
            sampled_accuracy=float(combined_rewards(exact_match, repeated, sampled_texts)[0].mean()),
            reward_model_score=score,
            kl_to_reference=float((policy_log_probs - reference_log_probs).mean()),
            mean_answer_tokens=sum(len(c) for c in sampled.completions) / len(sampled.completions),
            completions=greedy_texts[:shown]))
    return results
