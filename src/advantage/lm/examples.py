"""Prompt-and-completion examples: tokenized once, batched for the model (shared by sft, reward, dpo, rlhf).

The language model as an MDP (docs/math.md, "Language models as an MDP"): the prompt's tokens are the initial state,
the completion's tokens the actions. Every completion ends with exactly one end token, so a model learns to stop
where sampling stops and a reward model scores the same position in training and in scoring: a chat template's end
of turn (without the newline ChatML writes after it), or the EOS appended to plain text (`tokenizer.end_completion`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from advantage.errors import UsageError
from advantage.lm.logprobs import collate
from advantage.lm.tokenizer import end_completion, end_token_ids


@dataclass(frozen=True)
class SFTExample:
    """One tokenized example: the prompt (the initial state) and the completion (the actions, ending with one end
    token)."""

    prompt_ids: list[int]
    completion_ids: list[int]


def tokenize_pairs(pairs: Sequence[tuple[str, str]], tokenizer, length: int,
                   end_ids: Sequence[int] | None = None) -> tuple[list[SFTExample], int]:
    """Token ids of (prompt, completion) texts, each completion ending with one end token, cut to `length` tokens;
    also how many were cut.

    The prompt is encoded with the tokenizer's special tokens (a Llama tokenizer adds its BOS; a BOS already
    written by a chat template is not doubled), the completion without. The completion ends right after its last
    end token (a chat template's end of turn, without the newline some templates write after it), or gets the EOS
    appended if it has none (`tokenizer.end_completion`). An empty prompt (a `text` row) becomes the BOS token, or,
    for tokenizers without one, the first token of the text: the first action needs a state.

    Args:
        end_ids: the ids that end a completion (`tokenizer.end_token_ids`; the first is the one appended);
            default the tokenizer's EOS alone.
    """
    bos = tokenizer.bos_token_id
    end_ids = tuple(end_ids) if end_ids else end_token_ids(tokenizer)
    examples, cut = [], 0
    for prompt, completion in pairs:
        prompt_ids = encode_prompt(tokenizer, prompt) if prompt else []
        completion_ids = end_completion(tokenizer.encode(completion, add_special_tokens=False), end_ids)
        if not prompt_ids:
            prompt_ids = [bos] if bos is not None else [completion_ids.pop(0)]
        if len(prompt_ids) + len(completion_ids) > length:
            cut += 1
            prompt_ids = prompt_ids[:length]
            completion_ids = completion_ids[:length - len(prompt_ids)]
        examples.append(SFTExample(prompt_ids, completion_ids))
    return examples, cut


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids, with the tokenizer's special tokens (its BOS, not doubled after a chat template's)."""
    ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def completion_tokens(examples: Sequence[SFTExample]) -> int:
    """The number of actions in the examples: the denominator N_tokens of the loss."""
    return sum(len(example.completion_ids) for example in examples)


# ----------------------------------------------------------------------------------------------------------- batches


@dataclass
class TokenBatch:
    """The model's input for one micro-batch, and which positions are scored.

    Attributes:
        input_ids: (B, T) long.
        attention_mask: (B, T) 1 for real tokens (one example per row), or (B, 1, T, T) additive float mask
            (0 where attending is allowed, the dtype's minimum elsewhere) for packed rows.
        position_ids: (B, T) long; restart at 0 for every example.
        loss_mask: (B, T) bool; True at completion tokens.
        real_tokens: prompt and completion tokens in the batch (padding excluded).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    loss_mask: Tensor
    real_tokens: int


def collate_examples(examples: Sequence[SFTExample], pad: int) -> TokenBatch:
    """One example per row, right padded (`logprobs.collate`)."""
    batch = collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad, "right")
    return TokenBatch(batch.input_ids, batch.attention_mask, batch.position_ids, batch.completion_mask,
                      int(batch.attention_mask.sum()))


def pack_examples(examples: Sequence[SFTExample], length: int, pad: int, dtype: torch.dtype) -> TokenBatch:
    """Several examples per row (in order, a new row when the next one does not fit in `length` tokens).

    Attention is isolated by a block-diagonal causal mask, and positions restart at 0 for every example, so each
    example's log-probabilities are those it has alone. Padding at the end of a row forms its own block.
    """
    rows: list[list[SFTExample]] = [[]]
    used = [0]  # tokens in each row
    for example in examples:
        size = len(example.prompt_ids) + len(example.completion_ids)
        if rows[-1] and used[-1] + size > length:
            rows.append([])
            used.append(0)
        rows[-1].append(example)
        used[-1] += size
    width = max(used)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    segment = torch.zeros((len(rows), width), dtype=torch.long)  # which example each token belongs to
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            tokens = example.prompt_ids + example.completion_ids
            end = start + len(tokens)
            input_ids[r, start:end] = torch.tensor(tokens)
            position_ids[r, start:end] = torch.arange(len(tokens))
            loss_mask[r, start + len(example.prompt_ids):end] = True
            segment[r, start:end] = s
            start = end
        segment[r, start:] = len(row)  # the padding block
        position_ids[r, start:] = torch.arange(width - start)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T): query t sees keys <= t
    allowed = causal & (segment[:, :, None] == segment[:, None, :])  # (B, T, T): ... of its own example only
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    real_tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    return TokenBatch(input_ids, mask.unsqueeze(1), position_ids, loss_mask, real_tokens)  # mask (B, 1, T, T)


# --------------------------------------------------------------------------------------------------------- filtering


def keep_trainable(trainable: Sequence[bool], where: Sequence[str], length: int, what: str,
                   kind: str) -> list[int]:
    """The indices of the examples that still hold a token to learn from once cut to `length`.

    A prompt that fills the whole context leaves its completion nothing: such an example would train on no token
    at all (sft) or compare answers cut to nothing (reward, dpo). They are left out with a warning that counts them;
    if none is left, the run stops with one line naming the first such row.

    Raises:
        UsageError: when no example is trainable.
    """
    keep = [index for index, ok in enumerate(trainable) if ok]
    if len(keep) == len(trainable):
        return keep
    first = where[trainable.index(False)]
    if not keep:
        raise UsageError(f"{first}: the prompt fills all max_length={length} tokens, so no {what} {kind[:-1]} has a "
                         f"token left to train on; raise --max-length or shorten the prompts")
    print(f"advantage: {len(trainable) - len(keep)} of {len(trainable)} {what} {kind} have no token left to train on "
          f"once cut to max_length={length} (the prompt fills it; the first: {first}) and are left out",
          file=sys.stderr)
    return keep


def cycled_batch(examples: Sequence[SFTExample], index: int, size: int, pad: int) -> TokenBatch:
    """Batch `index` of `size` examples taken in order and cycling through them (PPO-ptx's pretraining batches)."""
    start = (index * size) % len(examples)
    return collate_examples([examples[(start + i) % len(examples)] for i in range(size)], pad)
