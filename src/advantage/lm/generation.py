"""Batched sampling from a causal LM with our own decoding loop over transformers' key-value cache.

Online RL (GRPO, RLHF-PPO) samples G completions of every prompt from the current policy and then needs, for every
sampled token, its log-probability under the distribution it was drawn from (the "old" policy of the importance
ratio). `generate` returns both, so no second forward pass is needed to start the update.

The loop, for B prompts and G samples per prompt (N = B * G rows):

    prefill   the B left-padded prompts go through the model once, filling a `transformers.DynamicCache`
    repeat    the cache (and the prompt's last logits) are repeated G times along the batch: row b * G + g
    decode    one token per step for all N rows: the last token goes in, the logits of its position come out,
              a token is drawn from softmax(filtered logits / temperature) and appended

Left padding keeps every row's last token in the last column, so one `logits_to_keep=1` slice serves all rows; the
attention mask (0 on padding) and position ids counting real tokens only (as `logprobs.completion_log_probs` uses
them) make each row see exactly what it would see alone:

    prompt columns   completion columns (one per step)
    . . p p p        c c c E .            attention 0 0 1 1 1 | 1 1 1 1 0    positions 0 0 0 1 2 | 3 4 5 6 7
    p p p p p        c c c c c                      1 1 1 1 1 | 1 1 1 1 1

A row that has finished (it emitted an end token, or its completion ends with a stop sequence) is fed the pad token with
attention 0 while it stays in the batch, and its later log-probabilities are 0; once a quarter of the batch has
finished, the finished rows leave it (and the cache), so they stop costing compute. The loop ends when every row has
finished or after max_new_tokens steps. A model sharded over the processes (FSDP2, `lm/sharding.py`) gathers its
weights from every process at each forward pass, so there the loop ends when every row *of every process* has
finished: a process whose rows are done keeps stepping (on its finished rows, which change nothing) until the others
are.

Speed. Nothing in a step loops over rows in Python: each step is a few tensor operations on the whole batch, and one
host sync (are all rows finished?). The prompt runs once for its G samples (transformers' `generate` with
`num_return_sequences` runs it G times). The cache's layers write each step's keys and values into preallocated
buffers (`kv_cache.key_value_cache`) where transformers' `DynamicLayer` concatenates them to all earlier ones at
every step. On a GPU the decoding step is captured once as a CUDA graph and replayed (`cuda_graphs.FixedShapeStep`):
the same loop, with finished rows kept in the batch, since a graph's shapes are fixed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advantage.lm.cuda_graphs import decoding_mode, fixed_shape_step
from advantage.lm.kv_cache import key_value_cache
from advantage.lm.logprobs import _forward_parameters, position_ids_from_attention_mask
from advantage.lm.lora_folding import adapters_folded


@dataclass
class Generated:
    """The prompts, their sampled completions and the log-probability of every sampled token.

    Attributes:
        prompts: the B prompts as given.
        completions: B * G token-id lists; row b * G + g is sample g of prompt b. Each ends with the end token that
            stopped it (one of eos_id), or with the stop sequence that stopped it, else has max_new_tokens tokens.
        sampled_log_probs: (B * G, max_new_tokens) float32; entry t is the log-probability of completion token t
            under the distribution it was drawn from (logits / temperature, then top-k / top-p renormalised);
            0 after the completion ends.
        samples_per_prompt: G.
    """

    prompts: list[list[int]]
    completions: list[list[int]]
    sampled_log_probs: Tensor
    samples_per_prompt: int


def _validate(prompts: Sequence[Sequence[int]], samples_per_prompt: int, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, stop_sequences: Sequence[Sequence[int]]) -> None:
    """Raise ValueError, naming the argument, for anything `generate` cannot sample with."""
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("prompts: every prompt needs at least one token (the first token needs a prefix)")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if any(len(sequence) == 0 for sequence in stop_sequences):
        raise ValueError("stop_sequences must not contain an empty sequence")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of `model` in eval mode (no dropout) and restore each module's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The prompts as one left-padded batch, so that every row's last token is in the last column.

    Args:
        prompts: B non-empty token-id lists.
        pad_id: id written at padded positions.
        device: where the tensors go.

    Returns:
        input_ids (B, P) long and attention_mask (B, P) long (0 on padding), P the longest prompt's length.
    """
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k, then top-p (nucleus) filtering: the logits of the tokens left out become -inf.

    Args:
        logits: (N, V) float, already divided by the temperature.
        top_k: keep the k largest logits of each row (ties with the k-th are kept too); 0 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (always at least the
            most likely one); 1.0 keeps all.

    Returns:
        (N, V): log_softmax of it is the renormalised distribution that is sampled from.
    """
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # A token stays when the tokens more likely than it hold less than top_p: the most likely always stays.
        dropped_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        dropped = dropped_sorted.scatter(-1, order, dropped_sorted)  # back to vocabulary order
        logits = logits.masked_fill(dropped, float("-inf"))
    return logits


def sample_tokens(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, greedy: bool = False) -> tuple[Tensor, Tensor]:
    """Draw one token per row and its log-probability under the distribution it was drawn from.

    Args:
        logits: (N, V) the model's next-token logits (any float dtype; computed in float32).
        temperature, top_k, top_p: the distribution is softmax(filter_logits(logits / temperature, top_k, top_p)).
        generator: the random source of the one uniform number each row draws.
        greedy: take the most likely token instead of sampling (its log-probability is still reported).

    Returns:
        tokens (N,) long and log_probs (N,) float32.

    Sampling is by the inverse of the cumulative distribution: with u ~ U[0, 1) per row, the token is the first
    whose cumulative probability exceeds u. One random number per row instead of `torch.multinomial`'s one per
    vocabulary entry, which with a real vocabulary (49,152) took a fifth of a decoding step on the CPU. Cumulative
    sums are float32: a token's probability is resolved to about 1e-7.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)  # (N, V), -inf where filtered
    if greedy:
        tokens = log_probs.argmax(dim=-1)
    else:
        cumulative = log_probs.exp().cumsum(dim=-1)  # (N, V), non-decreasing; flat over filtered tokens
        total = cumulative[:, -1:]  # (N, 1), 1 up to rounding
        # Drawn where the generator lives (a CPU generator draws the same numbers whatever the model's device).
        uniform = torch.rand((len(logits), 1), generator=generator,
                             device=generator.device if generator is not None else logits.device).to(logits.device)
        # The first token whose cumulative sum exceeds u * total has a positive probability; the threshold stays
        # below the total, so one always exists (u * total can round up to the total itself).
        threshold = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cumulative, threshold, right=True).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class StopSequences:
    """Tests, for all rows at once, whether the completion tokens so far end with one of the stop sequences.

    Sequences of the same length are stacked into one (K, L) tensor, so a check costs one comparison per distinct
    length, whatever the number of rows. A stop sequence has to lie within the completion (the prompt's tokens do
    not count).
    """

    def __init__(self, stop_sequences: Sequence[Sequence[int]], device: torch.device):
        by_length: dict[int, list[list[int]]] = {}
        for sequence in stop_sequences:
            by_length.setdefault(len(sequence), []).append(list(sequence))
        self.stacked = [torch.tensor(group, dtype=torch.long, device=device) for group in by_length.values()]

    def ended(self, tokens: Tensor, rows: Tensor, length: int) -> Tensor | None:
        """Which of `rows` have a completion, tokens[row, :length], ending with a stop sequence.

        Args:
            tokens: (N, max_new_tokens) long; completion tokens so far in the first `length` columns.
            rows: (M,) long; the rows to check.
            length: completion tokens sampled so far.

        Returns:
            (M,) bool, or None when no stop sequence fits in `length` tokens.
        """
        ended = None
        for sequences in self.stacked:  # (K, L)
            width = sequences.shape[1]
            if width > length:
                continue
            tail = tokens[rows, length - width:length]  # (M, L)
            matches = (tail.unsqueeze(1) == sequences.unsqueeze(0)).all(dim=-1).any(dim=-1)  # (M,)
            ended = matches if ended is None else ended | matches
        return ended


def _cache_keyword(model: nn.Module) -> str:
    """The name of the forward argument that takes the key-value cache: `cache` since transformers 5.24, before
    that `past_key_values`."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _model_inputs(model: nn.Module) -> dict:
    """The keyword arguments every forward call of the loop adds, among those the model accepts."""
    accepted = _forward_parameters(model)
    extra = {"use_cache": True}
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = 1  # the language-model head runs on the last position only
    return extra


# Finished rows leave the decoding batch once the rows still sampling are at most this fraction of it: dropping them
# copies the cache once, keeping them costs a forward pass on each of them at every later step.
COMPACT_BELOW = 0.75


@dataclass
class _DecodingBatch:
    """The M rows the model still runs on (M <= N = B * G: finished rows are dropped now and then).

    Attributes:
        rows: (M,) long; the output row (b * G + g) of each batch row.
        alive: (M,) bool; False once the row has finished (it is then fed the pad token with attention 0).
        attention_mask: (M, P + max_new_tokens) long; column P + t is written at step t.
        positions: (M, 1) long; position id of the last token fed.
        last_tokens: (M, 1) long; the tokens to feed at the next step.
    """

    rows: Tensor
    alive: Tensor
    attention_mask: Tensor
    positions: Tensor
    last_tokens: Tensor

    def select(self, kept: Tensor) -> _DecodingBatch:
        """The batch rows `kept` ((K,) long), in that order."""
        return _DecodingBatch(self.rows[kept], self.alive[kept], self.attention_mask[kept], self.positions[kept],
                              self.last_tokens[kept])


def _prefill(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, cache, samples_per_prompt: int,
             max_new_tokens: int, extra: dict) -> tuple[Tensor, _DecodingBatch]:
    """Run the B prompts through the model once, then repeat the cache G times along the batch.

    Args:
        prompt_ids, prompt_mask: (B, P) left padded.
        cache: an empty `DynamicCache`; it holds the N = B * G rows' prompts afterwards.
        samples_per_prompt: G.
        max_new_tokens: room to leave in the attention mask.
        extra: keyword arguments of every forward call.

    Returns:
        The next-token logits (N, V) of every row and the N rows as a `_DecodingBatch`.
    """
    positions = position_ids_from_attention_mask(prompt_mask)
    # (B, V): left padding puts every prompt's last token in the last column
    logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                   **{_cache_keyword(model): cache}, **extra).logits[:, -1]
    if samples_per_prompt > 1:  # row b becomes rows b * G .. b * G + G - 1, in the cache and everywhere else
        cache.batch_repeat_interleave(samples_per_prompt)
        logits, prompt_mask, positions = (tensor.repeat_interleave(samples_per_prompt, dim=0)
                                          for tensor in (logits, prompt_mask, positions))
    rows = len(logits)
    # Every step's attention mask is a prefix of this one: no concatenation per step.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(rows, max_new_tokens)], dim=1)
    everyone = torch.arange(rows, device=logits.device)
    return logits, _DecodingBatch(rows=everyone, alive=torch.ones(rows, dtype=torch.bool, device=logits.device),
                                  attention_mask=attention_mask, positions=positions[:, -1:],
                                  last_tokens=torch.zeros((rows, 1), dtype=torch.long, device=logits.device))


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int = 1, max_new_tokens: int,
             eos_id: int | Sequence[int], pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_sequences: Sequence[Sequence[int]] = (), generator: torch.Generator | None = None,
             greedy: bool = False, min_new_tokens: int = 0, cuda_graph: bool = True) -> Generated:
    """Sample `samples_per_prompt` completions of every prompt, with the log-probability of every sampled token.

    Args:
        model: a transformers causal LM (Qwen2, Llama, GPT-2 style) or a PEFT model around one; it is put in eval
            mode for the call and left in the mode it had. LoRA adapters are folded into the weights for the call
            (`lora_folding.adapters_folded`: the same distribution up to float rounding, at the base model's cost).
        prompts: B non-empty token-id lists, of any lengths.
        samples_per_prompt: G; the prompt is computed once and its key-value cache shared by its G samples.
        max_new_tokens: the longest completion.
        eos_id: the end token, or several (`tokenizer.end_token_ids`: the tokenizer's EOS and every id of the
            model's `generation_config.eos_token_id`); a row stops after sampling any of them (it is part of the
            completion).
        pad_id: fills the left padding of short prompts and is fed to finished rows (always with attention 0).
        temperature: logits are divided by it (> 0).
        top_k: sample among the k most likely tokens only; 0 = off.
        top_p: sample among the smallest set of most likely tokens holding probability top_p; 1.0 = off.
        stop_sequences: token-id lists; a row also stops when its completion ends with one (which stays in it).
        generator: random source of the sampling, on the model's device; the same seed gives the same completions.
        greedy: take the most likely token at every step instead of sampling.
        min_new_tokens: no end token can be sampled before this many tokens (probability 0 there, and the other
            tokens' log-probabilities are those of that renormalised distribution); for fixed-length benchmarks.
        cuda_graph: on a GPU, capture the decoding step once as a CUDA graph and replay it (`cuda_graphs`);
            where the capture fails, a warning says why and the steps run one call at a time. Ignored on a CPU.

    Returns:
        A `Generated`: completions (B * G lists, row b * G + g is sample g of prompt b) and sampled_log_probs
        (B * G, max_new_tokens) float32, on the model's device.

    Raises:
        ValueError: an argument out of range (its name is in the message).
    """
    _validate(prompts, samples_per_prompt, max_new_tokens, temperature, top_k, top_p, stop_sequences)
    device = next(model.parameters()).device
    end_list = [eos_id] if isinstance(eos_id, int) else [int(token) for token in eos_id]
    end_ids = torch.tensor(end_list, dtype=torch.long, device=device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, greedy=greedy)
    stops = StopSequences(stop_sequences, device)
    extra = _model_inputs(model)
    synced = _sharded_over_processes(model)
    with _eval_mode(model), adapters_folded(model):
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P)
        width = prompt_ids.shape[1]
        cache = key_value_cache(model, width + max_new_tokens)
        logits, batch = _prefill(model, prompt_ids, prompt_mask, cache, samples_per_prompt, max_new_tokens, extra)
        early_end = _end_token_bias(end_list, logits.shape[-1], device) if min_new_tokens else None
        extra[_cache_keyword(model)] = cache
        mode = decoding_mode(model, device, cuda_graph, cache, max_new_tokens, synced)
        fixed = fixed_shape_step(model, cache, batch, width + max_new_tokens, extra, mode)  # None: the loop below
        rows = len(batch.rows)  # N = B * G
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        log_probs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
        real = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)  # True at completion tokens
        steps = 0
        for step in range(max_new_tokens):
            if step > 0:  # feed the tokens sampled last (pad, with attention 0, in finished rows)
                batch.positions = batch.positions + 1
                if fixed is not None:
                    logits = fixed(batch.last_tokens, batch.positions, batch.attention_mask, width + step)
                else:
                    logits = model(input_ids=batch.last_tokens, position_ids=batch.positions,
                                   attention_mask=batch.attention_mask[:, :width + step], **extra).logits[:, -1]
            if step < min_new_tokens:
                logits = logits + early_end  # -inf at the end tokens
            sampled, sampled_log_probs = sample_tokens(logits, **sampling)
            sampled = torch.where(batch.alive, sampled, pad_id)
            tokens[batch.rows, step] = sampled
            log_probs[batch.rows, step] = torch.where(batch.alive, sampled_log_probs, 0.0)
            real[batch.rows, step] = batch.alive
            batch.attention_mask[:, width + step] = batch.alive
            batch.last_tokens = sampled.unsqueeze(1)
            steps = step + 1
            finished = torch.isin(sampled, end_ids)
            stopped = stops.ended(tokens, batch.rows, steps)
            batch.alive &= ~finished if stopped is None else ~(finished | stopped)
            alive = int(batch.alive.sum())  # one host sync per step: cheap next to a forward pass
            if (alive if not synced else _most_over_processes(alive, device)) == 0:
                break
            if fixed is None and 0 < alive <= COMPACT_BELOW * len(batch.rows) and steps < max_new_tokens:
                kept = batch.alive.nonzero().squeeze(1)
                cache.batch_select_indices(kept)
                batch = batch.select(kept)
    lengths = real[:, :steps].sum(dim=1).tolist()
    completions = [row[:length] for row, length in zip(tokens[:, :steps].tolist(), lengths)]
    return Generated(prompts=[[int(token) for token in prompt] for prompt in prompts], completions=completions,
                     sampled_log_probs=log_probs, samples_per_prompt=samples_per_prompt)


def _end_token_bias(end_ids: Sequence[int], vocabulary: int, device: torch.device) -> Tensor:
    """(V,) float32, -inf at the end tokens and 0 elsewhere: added to the logits while no end token may be sampled
    (`min_new_tokens`). Made once per call: one addition a step, where masking the logits by the ids would select
    them with a boolean mask, which reads its count back to the host at every step. Ids outside the vocabulary (-1:
    no end token) are left out."""
    bias = torch.zeros(vocabulary, dtype=torch.float32)
    bias[[token for token in end_ids if 0 <= token < vocabulary]] = -math.inf
    return bias.to(device)


def _sharded_over_processes(model: nn.Module) -> bool:
    """True when `model`'s forward passes are collective: sharded with FSDP2 over more than one process."""
    import torch.distributed as dist

    from advantage.lm.sharding import is_sharded

    return is_sharded(model) and dist.is_initialized() and dist.get_world_size() > 1


def _most_over_processes(count: int, device: torch.device) -> int:
    """The largest `count` over the processes (a collective: every process calls it at the same step)."""
    import torch.distributed as dist

    most = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


def greedy_decode(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int | Sequence[int],
                  pad_id: int, batch_size: int = 64, cuda_graph: bool = True) -> Generated:
    """The most likely completion of every prompt, `batch_size` prompts at a time: the one decoder of every
    evaluation (sft's and the online stages' held-out figures, `advantage eval`, the demo's comparison).

    Returns:
        A `Generated` with one completion per prompt (each ending with the end token that stopped it, if any).
    """
    parts = [generate(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens, eos_id=eos_id,
                      pad_id=pad_id, greedy=True, cuda_graph=cuda_graph)
             for start in range(0, len(prompts), batch_size)]
    return Generated(prompts=[prompt for part in parts for prompt in part.prompts],
                     completions=[completion for part in parts for completion in part.completions],
                     sampled_log_probs=torch.cat([part.sampled_log_probs for part in parts]), samples_per_prompt=1)
