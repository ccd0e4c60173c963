"""What the online stages (grpo; rlhf) share: sampling and reward settings, the prompts, the scorer of completions
(reward functions or a reward model), and the held-out evaluation by greedy decoding.

The token MDP of docs/math.md §5, sampled: a prompt is the initial state, the policy writes the completion token by
token (`generation.generate`), and the episode's return is the reward of the whole completion.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advantage.errors import UsageError
from advantage.lm.config import LMConfig, validate_lm
from advantage.lm.cuda_graphs import GraphedPasses
from advantage.lm.data import load_rows
from advantage.lm.data import prompts as prompt_texts
from advantage.lm.data_order import task_files
from advantage.lm.examples import encode_prompt
from advantage.lm.generation import Generated, generate, greedy_decode
from advantage.lm.loading import end_ids, load_policy, max_length, pad_id
from advantage.lm.logprobs import SharedPromptBatch, answer_log_probs, collate_shared_prompt
from advantage.lm.models import evaluation_mode
from advantage.lm.rewards import RewardFunction, combined_rewards, reward_functions
from advantage.lm.tokenizer import strip_end_tokens
from advantage.run.config import param, require
from advantage.run.processes import to_device

BUILTIN_TASK_REWARD = "advantage.lm.tasks.arithmetic:reward"
BUILTIN_CHAT_TASK_REWARD = "advantage.lm.tasks.arithmetic:answer_is_last_number"


def task_reward(config: LMConfig) -> str:
    """The built-in task's verifier: exact match of the leading number (text), or of the last one (chat)."""
    return BUILTIN_CHAT_TASK_REWARD if config.task_format == "chat" else BUILTIN_TASK_REWARD


@dataclass
class OnlineConfig(LMConfig):
    """Every LMConfig field, and the sampling and reward fields of the online stages."""

    reward_functions: str = param("", "comma-separated module:function (or path/file.py:function) reward functions "
                                      "f(prompts, completions, **columns) -> numbers (the data's other columns as "
                                      "keyword arguments, as in TRL); default with --task: the task's exact-match "
                                      "reward")
    reward_weights: str = param("", "comma-separated weights of the reward functions (default 1 each)")
    reward_model: str = param("", "a reward model directory (written by `advantage reward`) instead of functions")
    max_new_tokens: int = param(32, "longest completion in tokens")
    min_new_tokens: int = param(0, "no end token can be sampled before this many tokens (fixed-length benchmarks)")
    temperature: float = param(1.0, "sampling temperature (the log-probabilities are those of the same tempered "
                                    "distribution)")
    top_k: int = param(0, "sample among the k most likely tokens (0: all)")
    top_p: float = param(1.0, "nucleus sampling: the smallest set of tokens with this much probability")
    eval_max_prompts: int = param(200, "held-out prompts evaluated (greedy) at each evaluation, the first ones of the "
                                       "held-out data (0: all)")


def validate_online(config: OnlineConfig) -> None:
    """Checks of the shared fields (each stage adds its own)."""
    validate_lm(config)
    require(config.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", config.max_new_tokens)
    require(0 <= config.min_new_tokens <= config.max_new_tokens, "min_new_tokens", "must be in [0, max_new_tokens]",
            config.min_new_tokens)
    require(config.temperature > 0 and math.isfinite(config.temperature), "temperature", "must be > 0",
            config.temperature)
    require(config.top_k >= 0, "top_k", "must be >= 0", config.top_k)
    require(0 < config.top_p <= 1, "top_p", "must be in (0, 1]", config.top_p)
    require(not (config.reward_model and config.reward_functions), "reward_model",
            "and reward_functions exclude each other", config.reward_model)
    require(bool(config.reward_model or config.reward_functions or config.task != "none"), "reward_functions",
            "is required (or --reward-model, or a built-in --task)", config.reward_functions)




@dataclass
class PromptExample:
    """One prompt: its token ids (the initial state, docs/math.md §5), its text, and what reward functions are given.

    Attributes:
        text: the prompt as the model reads it (a conversation rendered by the chat template).
        ids: its token ids.
        prompt: the `prompt` column as the data holds it (a string, or a list of messages), passed to reward
            functions as TRL passes it.
        columns: the row's other columns, passed to reward functions as keyword arguments.
    """

    text: str
    ids: list[int]
    prompt: Any = None
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        """True when the prompt column is a list of messages."""
        return isinstance(self.prompt, list)


def load_prompts(config: OnlineConfig, run_dir: Path, tokenizer, length: int) -> tuple[list[PromptExample],
                                                                                     list[PromptExample]]:
    """Training and held-out prompts: the `prompt` column of --data / --eval-data, or the built-in task's."""
    if config.task != "none":
        files = task_files(config, run_dir)
        train_path, eval_path = files["sft_train"], files["sft_eval"]
    else:
        train_path, eval_path = config.data, config.eval_data
    train_rows = load_rows(train_path, "prompt")
    eval_rows = load_rows(eval_path, "prompt") if eval_path else []
    room = length - config.max_new_tokens  # a prompt leaves room for the longest completion
    if room < 1:
        raise UsageError(f"field 'max_new_tokens' ({config.max_new_tokens}) leaves no room for a prompt in "
                         f"max_length={length} tokens (the model's context); lower it or raise max_length")

    def examples(rows, what: str) -> list[PromptExample]:
        texts = prompt_texts(rows, tokenizer)
        encoded = [encode_prompt(tokenizer, text) for text in texts]
        cut = sum(len(ids) > room for ids in encoded)
        if cut:  # the end of a prompt (the question, the generation prompt) matters most: its start is dropped
            print(f"advantage: {cut} of {len(encoded)} {what} prompts are longer than max_length - max_new_tokens = "
                  f"{room} tokens and were cut at the left", file=sys.stderr)
        return [PromptExample(text, ids[-room:], row.columns["prompt"],
                              {name: value for name, value in row.columns.items() if name != "prompt"})
                for row, text, ids in zip(rows, texts, encoded)]

    return examples(train_rows, "training"), examples(eval_rows, "held-out")[:config.eval_max_prompts or None]


# --------------------------------------------------------------------------------------------------------- rewards


class Scorer:
    """The reward of each completion: the weighted reward functions, or a reward model's score at the last token.

    With a built-in task, the task's exact-match reward is also computed for the logs whenever it is not the
    training reward itself (rewards/exact_match, eval/exact_match): what the policy learns is then checked against
    the truth, not only against the reward model's opinion.

    Args:
        config: the stage's config (reward_model or reward_functions, task).
        tokenizer: decodes the completions for the reward functions.
        end_ids: the ids that end a completion (`tokenizer.end_token_ids`), left out of the decoded text.
        device: where the reward model runs and the rewards are returned.
    """

    def __init__(self, config: OnlineConfig, tokenizer, end_ids: Sequence[int],
                 device: torch.device = torch.device("cpu")):
        self.tokenizer = tokenizer
        self.end_ids = tuple(end_ids)
        self.device = device
        self.model = None
        self.functions: list[RewardFunction] = []
        self.monitor: list[RewardFunction] = []
        if config.reward_model:
            from advantage.lm.models import ScalarHeadModel

            if not Path(config.reward_model).is_dir():
                raise UsageError(f"field 'reward_model': no directory '{config.reward_model}'")
            self.model = ScalarHeadModel.from_pretrained(config.reward_model).to(device)
        else:
            self.functions = reward_functions(config.reward_functions or task_reward(config), config.reward_weights)
        if config.task != "none" and (config.reward_model or config.reward_functions):
            self.monitor = reward_functions(task_reward(config))

    def texts(self, completions: Sequence[list[int]]) -> list[str]:
        """The completions' text, without their end tokens."""
        return [self.tokenizer.decode(strip_end_tokens(completion, self.end_ids), skip_special_tokens=True)
                for completion in completions]

    def __call__(self, prompts: Sequence[PromptExample], generated: Generated) -> tuple[Tensor, dict[str, float]]:
        """((B * G,) rewards, {metric name: mean}) for the completions of `generated` (row b * G + g: prompt b).

        Reward functions get the prompts and completions as TRL passes them (strings, or messages for a
        conversational prompt column) and the rows' other columns as keyword arguments (`rewards`).
        """
        group = generated.samples_per_prompt
        texts = self.texts(generated.completions)
        repeated = [prompt for prompt in prompts for _ in range(group)]  # row b * G + g: prompt b
        logs = {}
        columns = {name: [prompt.columns.get(name) for prompt in repeated]
                   for name in sorted({name for prompt in prompts for name in prompt.columns})}
        if self.monitor:
            logs["rewards/exact_match"] = float(combined_rewards(
                self.monitor, [prompt.text for prompt in repeated], texts, **columns)[0].mean())
        if self.model is not None:
            with torch.no_grad():
                batch = collate_shared_prompt(generated.prompts, groups_of(generated.completions, group),
                                              pad_id(self.tokenizer))
                return self.model.score_answers(to_device(batch, self.device)).float(), logs
        completions = [[{"role": "assistant", "content": text}] for text in texts] \
            if repeated and repeated[0].conversational else texts
        columns["completion_ids"] = [list(completion) for completion in generated.completions]
        total, each = combined_rewards(self.functions, [prompt.prompt if prompt.prompt is not None else prompt.text
                                                        for prompt in repeated], completions, **columns)
        return total.to(self.device), {**logs, **{f"rewards/{name}": float(values.mean())
                                                  for name, values in each.items()}}


def groups_of(completions: Sequence[list[int]], group: int) -> list[list[list[int]]]:
    """[c_0..c_{G-1}], [c_G..c_{2G-1}], ...: the completions of each prompt."""
    return [list(completions[start:start + group]) for start in range(0, len(completions), group)]


@dataclass
class OnlineModels:
    """The models an online stage samples from, scores with and compares to, and the ids that pad and end answers.

    Args:
        policy: the model being trained (a PEFT model under LoRA).
        reference: a frozen copy of the starting model; None under LoRA (the reference is then the policy with its
            adapters switched off) or when no reference is needed.
        scorer: the reward of a completion.
        pad, ends: the padding id and the ids that end an answer.
        value_model: V(s_t) of the answer's prefixes (rlhf's `ScalarHeadModel`); None where the stage has none.
    """

    policy: nn.Module
    reference: nn.Module | None
    scorer: Scorer
    pad: int
    ends: tuple[int, ...]
    value_model: nn.Module | None = None

    def sample(self, prompts: Sequence[PromptExample], per_prompt: int, config: OnlineConfig,
               generator: torch.Generator) -> Generated:
        """`per_prompt` completions of each prompt from the current policy, with the config's sampling settings."""
        return generate(self.policy, [prompt.ids for prompt in prompts], samples_per_prompt=per_prompt,
                        max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                        eos_id=self.ends, pad_id=self.pad, temperature=config.temperature, top_k=config.top_k,
                        top_p=config.top_p, generator=generator, cuda_graph=config.cuda_graphs)

    @torch.no_grad()
    def policy_log_probs(self, batch: SharedPromptBatch, temperature: float,
                         graphs: GraphedPasses | None = None) -> Tensor:
        """log pi(a_t | s_t) of the batch's answer tokens under the current policy, in eval mode, without an
        autograd graph: log pi_old once the policy moves. `graphs`: replayed as a CUDA graph (`scored_answers`)."""
        with evaluation_mode(self.policy):
            return scored_answers(self.policy, batch, temperature, graphs)

    @torch.no_grad()
    def reference_log_probs(self, batch: SharedPromptBatch, temperature: float,
                            graphs: GraphedPasses | None = None) -> Tensor:
        """log pi_ref(a_t | s_t) of the batch's answer tokens: the frozen copy, or the policy without its adapters.
        `graphs`: replayed as a CUDA graph (`scored_answers`), one kept for the reference alone."""
        if self.reference is not None:
            with evaluation_mode(self.reference):
                return scored_answers(self.reference, batch, temperature, graphs)
        with self.policy.disable_adapter():
            return self.policy_log_probs(batch, temperature, graphs)


def scored_answers(model: nn.Module, batch: SharedPromptBatch, temperature: float,
                   graphs: GraphedPasses | None) -> Tensor:
    """`logprobs.answer_log_probs` of the batch, or with `graphs` (`cuda_graphs.GraphedPasses` without gradients)
    its pass replayed as a CUDA graph over fixed shapes, with the same values. A graph replays the kernels it
    recorded: one `graphs` serves one model in one mode (the policy in eval mode, the reference, ...)."""
    if graphs is None:
        return answer_log_probs(model, batch, temperature)
    return graphs(batch.tensors(), lambda tensors: (
        answer_log_probs(model, batch.with_tensors(tensors), temperature, fixed_shape=True),))[0]


def load_online(config: OnlineConfig, run_dir: Path, needs_reference: bool,
                device: torch.device) -> tuple[OnlineModels, Any, int, list[PromptExample], list[PromptExample]]:
    """Everything an online stage starts from, on `device`, before any adapter is added: (the models, the
    tokenizer, the longest sequence, the training prompts, the held-out prompts).

    The reference is a frozen copy of the starting policy when `needs_reference`, except under LoRA, where the
    policy with its adapters switched off is the reference and no copy is kept; a reward model is frozen.
    """
    model, tokenizer = load_policy(config, device)
    pad, ends, length = pad_id(tokenizer), end_ids(tokenizer, model), max_length(config, model)
    train_prompts, eval_prompts = load_prompts(config, run_dir, tokenizer, length)
    scorer = Scorer(config, tokenizer, ends, device)
    if scorer.model is not None:
        scorer.model.requires_grad_(False)
    reference = None
    if needs_reference and not config.lora_r:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return OnlineModels(model, reference, scorer, pad, ends), tokenizer, length, train_prompts, eval_prompts


@torch.no_grad()
def evaluate(model: nn.Module, prompts: Sequence[PromptExample], scorer: Scorer, config: OnlineConfig,
             pad: int) -> dict[str, float]:
    """eval/reward and eval/mean_length of greedy completions of the held-out prompts (and eval/exact_match with a
    built-in task scored by another reward)."""
    generated = greedy_decode(model, [prompt.ids for prompt in prompts], max_new_tokens=config.max_new_tokens,
                              eos_id=scorer.end_ids, pad_id=pad, cuda_graph=config.cuda_graphs)
    scores, logs = scorer(prompts, generated)
    lengths = [len(completion) for completion in generated.completions]
    figures = {"eval/reward": sum(scores.tolist()) / len(prompts), "eval/mean_length": sum(lengths) / len(lengths)}
    if "rewards/exact_match" in logs:
        figures["eval/exact_match"] = logs["rewards/exact_match"]
    return figures
