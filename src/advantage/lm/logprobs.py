"""Log-probabilities of a completion given its prompt: the one place they are computed.

The language model as an MDP (docs/math.md §5): the state s_t is the token prefix x_<t, the action a_t is the next
token x_t, and the transition is deterministic (append the token). A policy pi(a_t | s_t) is the softmax of the
model's logits at position t - 1, so for a completion a_1..a_L after a prompt

    log pi(completion | prompt) = sum_t log pi(a_t | s_t),

the sum of per-token log-probabilities over the completion positions only. Every algorithm (SFT's likelihood,
the PPO ratio, the KL to a reference, DPO's implicit reward, GRPO) reads its log-probabilities from here, so
padding, position ids and the off-by-one shift are handled once.

Layout of a batch (B sequences of length T, each prompt followed by its completion):

    right padding:  p p p c c . .        left padding:  . . p p p c c
    attention_mask: 1 1 1 1 1 0 0                       0 0 1 1 1 1 1
    completion_mask:0 0 0 1 1 0 0                       0 0 0 0 0 1 1
    position_ids:   0 1 2 3 4 4 4                       0 0 0 1 2 3 4

Position ids count real tokens only, so a left-padded sequence sees exactly the positions (and, with the
attention mask, exactly the context) it would see alone: its log-probabilities do not depend on the batch.
(Rotary embeddings, as in Qwen2 and Llama, are blind to a constant shift of all positions; learned absolute
positions, as in GPT-2, are not, and neither is the max_position_embeddings limit.)

Large vocabularies. A model's logits are a (B, T, V) tensor: with a real vocabulary (49,152 for SmolLM2, 151,936
for Qwen2.5) and a batch of sampled answers, that one tensor outweighs the model (64 answers x 80 tokens x 151,936
x 4 bytes = 3.1 GB), and autograd keeps it, its exponentials and its gradient alive at once. Only the tokens that
are actions need a log-probability, and only the chosen token's entry of each row. So the model's body runs alone
(B, T, hidden), the hidden states of the positions that score an action are gathered (N, hidden), and the
language-model head runs on them in chunks of max(`LOGITS_CHUNK_ELEMENTS // V`, `MIN_CHUNK_ROWS`) rows
(`head_log_probs`): each chunk's logits are reduced to log softmax(logits)[target] and dropped, and in training the
chunk is checkpointed, so its logits are recomputed in the backward pass instead of being kept (a frozen head's
gradient is formed in the forward pass instead). At most one chunk's logits (16 MiB, or 256 rows: 48 MiB at V 49k,
148 MiB at V 152k) exist at any time, in training, reference and scoring passes alike. Models whose logits are not
plain `lm_head(hidden)` are detected once (the head's
output is compared with the model's own logits) and use the whole forward pass instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from advantage.objectives.masking import fill_padding

PaddingSide = Literal["right", "left"]


def position_ids_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """Position of every token among the real tokens of its row: cumsum(mask) - 1, clamped at 0.

    Args:
        attention_mask: (B, T), 1 for real tokens, 0 for padding.

    Returns:
        (B, T) long tensor; left padding gets position 0 (masked anyway), right padding repeats the last position.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@dataclass
class PromptCompletionBatch:
    """A padded batch of prompt + completion sequences.

    Attributes:
        input_ids: (B, T) long; prompt tokens then completion tokens, padded with the pad id.
        attention_mask: (B, T) long; 1 for real (prompt or completion) tokens.
        completion_mask: (B, T) bool; True exactly at the completion tokens (never at position 0, which has no
            prefix to condition on).
        position_ids: (B, T) long; from `position_ids_from_attention_mask`.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    position_ids: Tensor

    @classmethod
    def from_masks(cls, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> PromptCompletionBatch:
        """A batch from already padded tensors (for example the output of generation); position ids are derived.

        Args:
            input_ids, attention_mask, completion_mask: (B, T) each; see the class attributes.
        """
        completion_mask = completion_mask.bool() & attention_mask.bool()
        if completion_mask[:, 0].any():
            raise ValueError("a completion token at position 0 has no prompt to condition on")
        return cls(input_ids, attention_mask.long(), completion_mask, position_ids_from_attention_mask(attention_mask))

    def to(self, device: torch.device | str) -> PromptCompletionBatch:
        """The same batch with every tensor on `device`."""
        return PromptCompletionBatch(self.input_ids.to(device), self.attention_mask.to(device),
                                     self.completion_mask.to(device), self.position_ids.to(device))


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
            padding_side: PaddingSide = "right") -> PromptCompletionBatch:
    """Concatenate each prompt with its completion and pad the B sequences to the longest one.

    Args:
        prompts: B token-id lists, each non-empty (the first completion token needs a prefix).
        completions: B token-id lists, possibly empty (then the row contributes no completion token).
        pad_id: id written at padded positions (any id: padded positions are masked out).
        padding_side: "right" (training) or "left" (all sequences end at the last column, as for generation).

    Returns:
        A PromptCompletionBatch with T = max_b (len(prompt_b) + len(completion_b)).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token (a completion token at position 0 has no state)")
    lengths = [len(prompt) + len(completion) for prompt, completion in zip(prompts, completions)]
    batch_size, width = len(prompts), max(lengths, default=0)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    completion_mask = torch.zeros((batch_size, width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start = 0 if padding_side == "right" else width - lengths[row]
        prompt_end, end = start + len(prompt), start + lengths[row]
        input_ids[row, start:end] = torch.as_tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[row, start:end] = 1
        completion_mask[row, prompt_end:end] = True
    return PromptCompletionBatch(input_ids, attention_mask, completion_mask,
                                 position_ids_from_attention_mask(attention_mask))


def token_log_probs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log pi(x_t | x_<t) for every position t, from the logits of a causal LM.

    Args:
        logits: (B, T, V); logits[:, t] is the model's output at position t, which scores token t + 1.
        input_ids: (B, T) long.

    Returns:
        (B, T) float32; entry t is log softmax(logits[:, t - 1])[x_t]. Entry 0 is 0 (no prefix).

    In float32/float64 this is logit[x_t] - logsumexp(logits): autograd keeps only the (B, T) result rather than
    a full (B, T, V) log_softmax. Half-precision logits are handled one row at a time in float32, since logsumexp
    in bfloat16 loses the digits that PPO ratios need (the same observation as TRL's selective_log_softmax).
    """
    return F.pad(picked_log_probs(logits[:, :-1], input_ids[:, 1:]), (1, 0))  # shift by one; position 0 gets 0


def picked_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits[b, t])[targets[b, t]]: the log-probability of each target under the logits beside it.

    Args:
        logits: (B, T, V).
        targets: (B, T) long, aligned with `logits` (no shift).

    Returns:
        (B, T) float32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        picked = torch.stack([
            torch.log_softmax(row.float(), dim=-1).gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
            for row, row_targets in zip(logits, targets)])
    else:
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return picked.float()


# Elements of one chunk of logits (float32: 16 MiB) in `head_log_probs`. Below glibc's 32 MiB mmap ceiling, so that
# small vocabularies' chunks are served from the heap again and again rather than mapped and unmapped (page faults
# on every chunk cost as much as its arithmetic on a CPU).
LOGITS_CHUNK_ELEMENTS = 1 << 22
# ...but never fewer rows than this, which wins from V = 16k on: every chunk reads the whole (V, hidden) head weight
# (and, when the head is trained, adds a whole (V, hidden) gradient), so with a large vocabulary tiny chunks spend
# their time moving the weight rather than multiplying (Qwen2.5's 151,936 x 896 head: 27-row chunks made a
# training pass 2.2x slower, benchmarks/README.md).
MIN_CHUNK_ROWS = 256


@dataclass
class HeadParts:
    """A causal LM split into the transformer body and the language-model head: logits = finish(head(body(x))).

    Attributes:
        body: the base model, returning `.last_hidden_state` (B, T, hidden).
        head: the output embedding (a Linear of hidden -> V, possibly LoRA-adapted).
        finish: what the model does to the head's output before returning it (Gemma 2's soft-capping, Cohere's
            logit scale, Granite's logit divisor), or None.
    """

    body: nn.Module
    head: nn.Module
    finish: Callable[[Tensor], Tensor] | None = None

    @property
    def vocabulary_size(self) -> int:
        """V, the number of logits per position."""
        return int(self.head.weight.shape[0])


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # causal LM -> HeadParts | None


def _finishing(config) -> Callable[[Tensor], Tensor] | None:
    """The transformation some models apply to lm_head's output, read from their config (None: none)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if not (softcap or scale or divisor):
        return None

    def finish(logits: Tensor) -> Tensor:
        if scale:
            logits = logits * scale
        if divisor:
            logits = logits / divisor
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return finish


def head_parts(model: nn.Module) -> HeadParts | None:
    """The body and head of a transformers causal LM (or of the model a PEFT wrapper holds), or None when its logits
    are not finish(head(body(x))) or when the model is sharded (FSDP2 gathers its weights on its own forward only).

    The split is verified once per model, in eval mode and without gradients, on a two-token input: the head's
    output on the body's hidden states must equal the model's own logits. Unknown post-processing then falls back
    to the whole forward pass rather than giving wrong log-probabilities.
    """
    from advantage.lm.sharding import is_sharded

    if is_sharded(model):  # FSDP2 gathers the weights on the model's own forward only (lm/sharding.py)
        return None
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return _VERIFIED[causal_lm]
    except (KeyError, TypeError):
        pass
    parts = None
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    body = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", ""), None)
    if isinstance(head, nn.Module) and hasattr(head, "weight") and isinstance(body, nn.Module) \
            and body is not causal_lm:
        candidate = HeadParts(body, head, _finishing(causal_lm.config))
        if _agrees_with_model(causal_lm, candidate):
            parts = candidate
    _VERIFIED[causal_lm] = parts
    return parts


@torch.no_grad()
def _agrees_with_model(causal_lm: nn.Module, parts: HeadParts) -> bool:
    modes = [(module, module.training) for module in causal_lm.modules()]
    causal_lm.eval()
    try:
        device = parts.head.weight.device
        input_ids = torch.tensor([[1, 2]], device=device) % parts.vocabulary_size
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        expected = causal_lm(**inputs).logits.float()
        logits = parts.head(parts.body(**inputs).last_hidden_state)
        logits = (parts.finish(logits) if parts.finish else logits).float()
        return logits.shape == expected.shape and torch.allclose(logits, expected, rtol=1e-4, atol=1e-5)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return False
    finally:
        for module, training in modes:
            module.training = training


def _chunk_log_probs(hidden: Tensor, targets: Tensor, head: nn.Module, finish: Callable | None,
                     temperature: float) -> Tensor:
    """log softmax(finish(head(hidden)) / temperature)[targets] for one chunk: (n, hidden), (n,) -> (n,) float32."""
    logits = head(hidden).float()  # (n, V): the only V-wide tensor, freed when this returns
    if finish is not None:
        logits = finish(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogProbs(torch.autograd.Function):
    """log softmax(F.linear(h, W, b) / T)[target] for a head that does not train, with its gradient with respect to
    h computed in the forward pass, chunk by chunk, so that the backward pass needs no logits at all.

    Each log-probability depends on its own hidden state only, and d log softmax(z)[a] / dz = e_a - softmax(z), so
    d log pi_n / d h_n = (e_{a_n} - p_n) W / T is one hidden-sized row per token: kept instead of the V-wide logits.
    The backward pass multiplies it by the incoming gradient. This saves the recomputation of every chunk's logits
    that checkpointing needs (about a third of the head's work) whenever the head is frozen, as with LoRA.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                rows: int) -> Tensor:
        picked = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        gradient = torch.empty_like(hidden)
        for start in range(0, len(targets), rows):
            chunk, chosen = hidden[start:start + rows], targets[start:start + rows].unsqueeze(-1)
            logits = F.linear(chunk, weight, bias).float()  # (n, V): as `_chunk_log_probs` computes them
            if temperature != 1.0:
                logits = logits / temperature
            normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            # The same operations as `_chunk_log_probs`: with or without gradients, the same bits.
            picked[start:start + rows] = logits.gather(-1, chosen).squeeze(-1) - normaliser.squeeze(-1)
            probabilities = logits.sub_(normaliser).exp_()  # (n, V) softmax, in the logits' own memory
            probabilities.scatter_add_(-1, chosen, torch.full_like(chosen, -1, dtype=probabilities.dtype))
            # (p - e_a) W / T = - d log pi / d h
            step = probabilities.to(weight.dtype) @ weight
            gradient[start:start + rows] = (step / -temperature).to(hidden.dtype)
        ctx.save_for_backward(gradient)
        return picked

    @staticmethod
    def backward(ctx, incoming: Tensor):
        (gradient,) = ctx.saved_tensors
        return incoming.unsqueeze(-1).to(gradient.dtype) * gradient, None, None, None, None, None


def head_log_probs(parts: HeadParts, hidden: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(target_n | state_n) from the body's hidden state of each state, the head run in chunks.

    Args:
        parts: the model's body and head (`head_parts`).
        hidden: (N, hidden) the hidden states of the positions that score each target.
        targets: (N,) long, the chosen tokens.
        temperature: the logits are divided by it.

    Returns:
        (N,) float32. At most max(`LOGITS_CHUNK_ELEMENTS`, `MIN_CHUNK_ROWS` x V) logits exist at once. With
        gradients on, a frozen plain linear head (LoRA, a frozen base) gets its gradient with respect to the hidden
        states in the forward pass (`_FrozenHeadLogProbs`); a trained head has each chunk checkpointed (its logits
        recomputed in the backward pass, not kept).
    """
    rows = max(1, MIN_CHUNK_ROWS, LOGITS_CHUNK_ELEMENTS // parts.vocabulary_size)
    tracking = torch.is_grad_enabled() and (hidden.requires_grad or parts.head.weight.requires_grad)
    head = parts.head
    if tracking and type(head) is nn.Linear and not head.weight.requires_grad and parts.finish is None \
            and (head.bias is None or not head.bias.requires_grad):
        return _FrozenHeadLogProbs.apply(hidden, targets, head.weight, head.bias, temperature, rows)
    pieces = []
    for start in range(0, len(targets), rows):
        arguments = (hidden[start:start + rows], targets[start:start + rows], parts.head, parts.finish, temperature)
        # No random numbers in a chunk: nothing to save and restore for its recomputation (nor to read back).
        pieces.append(checkpoint(_chunk_log_probs, *arguments, use_reentrant=False, preserve_rng_state=False)
                      if tracking else _chunk_log_probs(*arguments))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def masked_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                     target_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(x_t | x_<t) at every position t where `target_mask` is True, 0 elsewhere, without (B, T, V) logits.

    Args:
        model: a causal LM (or a PEFT model around one).
        input_ids: (B, T) long.
        attention_mask: (B, T) 1 for real tokens, or a (B, 1, T, T) additive mask (packed rows).
        position_ids: (B, T) long.
        target_mask: (B, T) bool; True at the tokens to score (never column 0, which has no state).
        temperature: the logits are divided by it.

    Returns:
        (B, T) float32. Token t is scored by the hidden state at t - 1 (`head_log_probs`); a model whose logits are
        not head(body(x)) goes through its whole forward pass instead (`token_log_probs`).
    """
    parts = head_parts(model)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    if parts is None:
        if "use_cache" in _forward_parameters(model):
            inputs["use_cache"] = False
        logits = model(**inputs).logits  # (B, T, V)
        log_probs = token_log_probs(logits / temperature if temperature != 1.0 else logits, input_ids)
        return fill_padding(log_probs, target_mask)
    hidden = parts.body(**inputs, use_cache=False).last_hidden_state  # (B, T, hidden)
    rows, columns = target_mask.nonzero(as_tuple=True)  # (N,) each: the scored tokens
    picked = head_log_probs(parts, hidden[rows, columns - 1], input_ids[rows, columns], temperature)  # (N,)
    return hidden.new_zeros(target_mask.shape, dtype=torch.float32).index_put((rows, columns), picked)


def _forward_parameters(model: nn.Module) -> set[str]:
    """Named parameters of the forward of `model` (of the wrapped model for a PEFT wrapper)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel forwards **kwargs to the model it wraps
        model = model.get_base_model()
    return set(inspect.signature(model.forward).parameters)


def completion_log_probs(model: nn.Module, batch: PromptCompletionBatch, temperature: float = 1.0) -> Tensor:
    """log pi(a_t | s_t) at every completion token, 0 elsewhere (per-action log-probabilities, docs/math.md §7b).

    Args:
        model: a causal LM taking (input_ids, attention_mask, position_ids), such as a transformers `*ForCausalLM`
            or a PEFT model around one.
        batch: the padded prompt + completion batch.
        temperature: logits are divided by it first, so the log-probabilities are those of the distribution
            that sampled with this temperature.

    Returns:
        (B, T) float32, zero outside `batch.completion_mask`. The language-model head runs on the completion
        tokens' states only, in chunks (`masked_log_probs`).
    """
    return masked_log_probs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.completion_mask,
                            temperature)


def sequence_log_probs(model: nn.Module, batch: PromptCompletionBatch, temperature: float = 1.0) -> Tensor:
    """log pi(completion | prompt) = sum over completion tokens of log pi(a_t | s_t) (docs/math.md §7b).

    Args:
        model, batch, temperature: as in `completion_log_probs`.

    Returns:
        (B,) float32; 0 for a row with an empty completion.
    """
    return completion_log_probs(model, batch, temperature).sum(dim=-1)


# ------------------------------------------------------------------------------------------- one prompt, K answers


@dataclass
class SharedPromptBatch:
    """B prompts, each with K answers, packed one prompt per row: the prompt's tokens go through the model once.

    Preference data compare answers to the same prompt (docs/math.md §7b): DPO and the reward model need the K sequences
    prompt + answer_k of each prompt. Concatenating each answer to its own copy of the prompt runs the prompt K
    times. Here row b holds prompt b followed by its K answers, and the attention mask lets every answer token see
    the prompt and the earlier tokens of its own answer only; answer tokens are positioned as if they came right
    after the prompt. Each answer is then computed exactly as in its own prompt + answer sequence (`concatenated`),
    up to float rounding, and the prompt's work is shared by its K answers (for pairs, 1 prompt instead of 2).

    Row layout (right padded), for a prompt p p p and answers a a / b:

        input_ids       p p p a a b .        position_ids    0 1 2 3 4 3 3
        answer token t of answer k lives in column answer_columns[b * K + k, t] and is scored by the logits of
        column predictor_columns[b * K + k, t]: the previous token of its answer, or the prompt's last token for t = 0.

    Attributes:
        input_ids: (B, W) long.
        attention: (B, W, W) bool; attention[b, i, j] is True where token i may attend to token j.
        position_ids: (B, W) long.
        answer_ids: (B * K, A) long; answer k of prompt b in row b * K + k (padded; an empty answer where prompt b
            has fewer than K).
        answer_mask: (B * K, A) bool; True for real answer tokens.
        answer_columns: (B * K, A) long; column of each answer token in its packed row (0 at padding).
        predictor_columns: (B * K, A) long; column whose logits score each answer token (0 at padding).
        prompt_lengths: (B,) long.
        answers_per_prompt: K.
    """

    input_ids: Tensor
    attention: Tensor
    position_ids: Tensor
    answer_ids: Tensor
    answer_mask: Tensor
    answer_columns: Tensor
    predictor_columns: Tensor
    prompt_lengths: Tensor
    answers_per_prompt: int

    @property
    def real_tokens(self) -> int:
        """Tokens the model runs on: every prompt token once, every answer token."""
        return int(self.prompt_lengths.sum()) + int(self.answer_mask.sum())

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the batch by field name (the inputs of a graphed pass, `cuda_graphs.GraphedPasses`)."""
        return {name: value for name, value in vars(self).items() if isinstance(value, Tensor)}

    def with_tensors(self, tensors: dict[str, Tensor]) -> SharedPromptBatch:
        """This batch with the tensors of `tensors()`'s names replaced by those given (other names ignored)."""
        fields = {name: value for name, value in tensors.items() if name in self.tensors()}
        return dataclasses.replace(self, **fields)

    @property
    def rows(self) -> Tensor:
        """(B * K,) the packed row of each answer: b for answers b * K .. b * K + K - 1."""
        return torch.arange(len(self.prompt_lengths), device=self.prompt_lengths.device).repeat_interleave(
            self.answers_per_prompt)

    def additive_mask(self, dtype: torch.dtype) -> Tensor:
        """The attention pattern as transformers' (B, 1, W, W) additive mask: 0 where allowed, dtype's min elsewhere."""
        return torch.zeros(self.attention.shape, dtype=dtype, device=self.attention.device).masked_fill(
            ~self.attention, torch.finfo(dtype).min).unsqueeze(1)

    def concatenated(self) -> PromptCompletionBatch:
        """The same B * K sequences with the prompt repeated before each answer (right padded, `collate`)."""
        prompts = [row[:length].tolist() for row, length in zip(self.input_ids, self.prompt_lengths.tolist())]
        answers = [row[mask].tolist() for row, mask in zip(self.answer_ids, self.answer_mask)]
        # Padded positions are masked out, so id 0 (in every vocabulary) serves as padding.
        return collate([prompts[int(b)] for b in self.rows], answers, 0, "right")


def collate_shared_prompt(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]],
                          pad_id: int, width_multiple: int = 1, answer_width_multiple: int = 1) -> SharedPromptBatch:
    """Pack B prompts and their answers into a SharedPromptBatch, one prompt per row.

    Args:
        prompts: B token-id lists, each non-empty.
        answers: B lists of answers (token-id lists, possibly empty); K is the longest list, shorter ones get
            empty answers.
        pad_id: id written at padded positions.
        width_multiple, answer_width_multiple: the packed rows' width W and the answers' width A are rounded up to
            multiples of these (more padding), so that batches fall into a few shapes (`cuda_graphs.GraphedPasses`).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token (a completion token at position 0 has no state)")
    repeats = max((len(group) for group in answers), default=1)
    width = max((len(prompt) + sum(len(answer) for answer in group) for prompt, group in zip(prompts, answers)),
                default=1)
    answer_width = max([1] + [len(answer) for group in answers for answer in group])
    width = math.ceil(width / width_multiple) * width_multiple
    answer_width = math.ceil(answer_width / answer_width_multiple) * answer_width_multiple
    count = len(prompts)
    # Built as Python lists and turned into tensors once per field: per-answer tensor writes cost ~16 operations an
    # answer, which on a GPU host are launch-bound time next to the forward pass (benchmarks/lm_launches.py).
    input_ids = [[pad_id] * width for _ in range(count)]
    position_ids = [[0] * width for _ in range(count)]
    segment = [[-1] * width for _ in range(count)]  # 0 the prompt, k + 1 answer k, -1 padding
    answer_ids = [[pad_id] * answer_width for _ in range(count * repeats)]
    answer_mask = [[False] * answer_width for _ in range(count * repeats)]
    answer_columns = [[0] * answer_width for _ in range(count * repeats)]
    predictor_columns = [[0] * answer_width for _ in range(count * repeats)]
    for b, (prompt, group) in enumerate(zip(prompts, answers)):
        length = len(prompt)
        input_ids[b][:length] = [int(token) for token in prompt]
        position_ids[b][:length] = range(length)
        segment[b][:length] = [0] * length
        start = length
        for k, answer in enumerate(group):
            size, row = len(answer), b * repeats + k
            if size == 0:
                continue
            tokens = [int(token) for token in answer]
            input_ids[b][start:start + size] = tokens
            position_ids[b][start:start + size] = range(length, length + size)
            segment[b][start:start + size] = [k + 1] * size
            answer_ids[row][:size] = tokens
            answer_mask[row][:size] = [True] * size
            answer_columns[row][:size] = range(start, start + size)
            predictor_columns[row][:size] = [length - 1, *range(start, start + size - 1)]
            start += size
        position_ids[b][start:] = range(width - start)  # padding: harmless positions, attended by nothing
    input_ids, position_ids, segment = (torch.tensor(field, dtype=torch.long)
                                        for field in (input_ids, position_ids, segment))
    answer_ids, answer_columns, predictor_columns = (torch.tensor(field, dtype=torch.long)
                                                     for field in (answer_ids, answer_columns, predictor_columns))
    answer_mask = torch.tensor(answer_mask, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_segment = segment[:, :, None] == segment[:, None, :]  # (B, W, W)
    sees_prompt = (segment[:, None, :] == 0) & (segment[:, :, None] >= 0)  # answers and prompt see the prompt
    # Padding (segment -1) attends to earlier padding only (a query row needs one allowed key); nothing real sees it.
    attention = causal & (same_segment | sees_prompt)
    return SharedPromptBatch(input_ids, attention, position_ids, answer_ids, answer_mask, answer_columns,
                             predictor_columns, torch.tensor([len(prompt) for prompt in prompts]), repeats)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (that of the additive attention mask it expects)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def shared_prompt_forward(model: nn.Module, batch: SharedPromptBatch, **kwargs):
    """The model's output on the packed rows of `batch` (B, W, ...), with its block attention mask and positions.

    Args:
        model: a transformers model (causal LM or base model, or a PEFT model around one) that accepts a 4-D
            additive attention mask, as transformers' decoder-only models do.
        kwargs: passed on to the model (e.g. `logits_to_keep`).
    """
    accepted = _forward_parameters(model)
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return model(input_ids=batch.input_ids, attention_mask=batch.additive_mask(_model_dtype(model)),
                 position_ids=batch.position_ids, **kwargs)


def answer_log_probs(model: nn.Module, batch: SharedPromptBatch, temperature: float = 1.0,
                     fixed_shape: bool = False) -> Tensor:
    """log pi(a_t | s_t) at every answer token, 0 elsewhere: `completion_log_probs` with each prompt run once.

    Args:
        model: a causal LM (or a PEFT model around one).
        batch: B prompts with K answers each (`collate_shared_prompt`).
        temperature: as in `completion_log_probs`.
        fixed_shape: score every (answer, position) slot, padding included, and mask afterwards, so that every
            tensor's shape follows the batch's shapes and nothing is read back to the host: what a CUDA graph can
            replay (`cuda_graphs.GraphedPasses`). The same values; the head's work grows by the padding.

    Returns:
        (B * K, A) float32, aligned with `batch.answer_ids`, zero outside `batch.answer_mask`. The head runs on the
        answer tokens' predicting states only, in chunks (`head_log_probs`).
    """
    parts = head_parts(model)
    if fixed_shape:
        return _every_slot_log_probs(model, parts, batch, temperature)
    answers, positions = batch.answer_mask.nonzero(as_tuple=True)  # (N,) each: every real answer token
    if parts is None:  # the whole forward pass, its logits from the earliest column that scores an answer token on
        width = batch.input_ids.shape[1]
        first = int(batch.prompt_lengths.min()) - 1
        kwargs = {"logits_to_keep": width - first} if "logits_to_keep" in _forward_parameters(model) else {}
        logits = shared_prompt_forward(model, batch, **kwargs).logits  # (B, W', V): columns W - W' .. W - 1
        offset = width - logits.shape[1]
        predicting = logits[batch.rows[answers], batch.predictor_columns[answers, positions] - offset]  # (N, V)
        if temperature != 1.0:
            predicting = predicting / temperature
        picked = picked_log_probs(predicting.unsqueeze(0), batch.answer_ids[answers, positions].unsqueeze(0))[0]
    else:
        hidden = shared_prompt_forward(parts.body, batch).last_hidden_state  # (B, W, hidden)
        states = hidden[batch.rows[answers], batch.predictor_columns[answers, positions]]  # (N, hidden)
        picked = head_log_probs(parts, states, batch.answer_ids[answers, positions], temperature)  # (N,)
    return picked.new_zeros(batch.answer_mask.shape).index_put((answers, positions), picked)


def _every_slot_log_probs(model: nn.Module, parts: HeadParts | None, batch: SharedPromptBatch,
                          temperature: float) -> Tensor:
    """`answer_log_probs` over all B * K * A slots (padding scored, then masked): shapes fixed by the batch's."""
    rows = batch.rows.unsqueeze(1).expand(batch.answer_ids.shape)  # (B * K, A): the packed row of each slot
    columns, targets = batch.predictor_columns, batch.answer_ids  # (B * K, A): 0 and pad at padding, harmless
    if parts is None:
        logits = shared_prompt_forward(model, batch).logits[rows, columns]  # (B * K, A, V)
        picked = picked_log_probs(logits / temperature if temperature != 1.0 else logits, targets)
    else:
        hidden = shared_prompt_forward(parts.body, batch).last_hidden_state  # (B, W, hidden)
        picked = head_log_probs(parts, hidden[rows, columns].flatten(0, 1), targets.flatten(), temperature)
    return torch.where(batch.answer_mask, picked.view(targets.shape), 0.0)


def answer_sequence_log_probs(model: nn.Module, batch: SharedPromptBatch, temperature: float = 1.0,
                              fixed_shape: bool = False) -> Tensor:
    """log pi(answer | prompt) of each of the B * K answers (docs/math.md §7b), each prompt run once; 0 for an
    empty answer. `fixed_shape`: as in `answer_log_probs`.

    Returns:
        (B * K,) float32.
    """
    return answer_log_probs(model, batch, temperature, fixed_shape).sum(dim=-1)
