"""The decoding step captured once as a CUDA graph and replayed: speed machinery of `generation.generate` on a GPU.

A small model's decoding step on a GPU is hundreds of small kernels launched one by one from Python, and the
launches, not the arithmetic, set its time. A CUDA graph replays them with one launch, provided that everything the
step reads and writes keeps its shape and address: `FixedShapeStep` runs the step on such buffers (with the cache's
layers switched to fixed shapes by `kv_cache.fix_cache_shapes`), `decoding_mode` says when a graph is asked for and
possible, and `fixed_shape_step` builds the step or, when the capture fails, warns once and lets `generate` run its
ordinary loop.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from advantage.lm.kv_cache import can_fix_shapes, fix_cache_shapes, release_cache_shapes


class FixedShapeStep:
    """One decoding step on buffers of fixed shapes, captured once as a CUDA graph and replayed at every step.

    On a GPU a small model's decoding step is hundreds of small kernels, each launched from Python (transformers'
    modules, then PyTorch's dispatcher): the launches, not the arithmetic, set its time. A CUDA graph records the
    step's kernels once and replays them with one launch. A graph replays the same kernels on the same memory, so
    everything the step reads or writes has a fixed shape and address: the N rows' last tokens and position ids,
    an additive attention mask over the whole cache (N, 1, 1, P + max_new_tokens; 0 where attended, the dtype's
    lowest value elsewhere) instead of the prefix seen so far, the cache's layers writing at a position held in a
    tensor (`kv_cache.PreallocatedLayer.fix_shapes`) and returning their whole buffers, and the logits. Finished
    rows therefore stay in the batch (they are fed the pad token with attention 0, as before, and change nothing).

    `capture=False` runs the same step on the same buffers without a graph: what the CPU tests check against the
    ordinary loop, so that only the capture itself is left to a GPU.

    Args:
        model: the causal LM `generate` samples from (adapters folded, eval mode).
        cache: its `kv_cache.key_value_cache`, holding the N rows' prompts.
        batch: `generate`'s decoding batch of N rows (`rows`, `attention_mask` (N, P + max_new_tokens),
            `positions` (N, 1)).
        capacity: P + max_new_tokens, the cache's length.
        extra: the keyword arguments of every forward call (the cache among them).
        capture: capture the step as a CUDA graph (on a GPU) or run it as it is.
    """

    def __init__(self, model: nn.Module, cache, batch, capacity: int, extra: dict, capture: bool):
        rows, device = len(batch.rows), batch.attention_mask.device
        self.model = model
        dtype = model.get_input_embeddings().weight.dtype  # the attention's dtype, which an additive mask must have
        self.masked = torch.finfo(dtype).min
        self.input_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.attention = torch.full((rows, 1, 1, capacity), self.masked, dtype=dtype, device=device)
        self.write_position = torch.zeros(1, dtype=torch.long, device=device)
        if not fix_cache_shapes(cache, self.write_position):
            raise RuntimeError("the model's key-value cache cannot take fixed shapes")
        # A 4-D mask goes to the attention as it is: transformers builds no mask of its own (no host sync).
        self.inputs = {**extra, "input_ids": self.input_ids, "position_ids": self.position_ids,
                       "attention_mask": self.attention}
        # A warm-up step before the capture, as CUDA graphs ask (lazy initialisations), run without a graph too so
        # that the CPU tests cover it. It runs for real: on the prompts (a row attending to nothing would give NaN),
        # writing its keys at the last position, which no step writes (a step at length L writes at L - 1 <=
        # capacity - 2) and which is zeroed again afterwards (0 x NaN or 0 x inf would still reach the outputs).
        prompt_width = cache.layers[0].keys.shape[2]
        self._set_mask(batch.attention_mask, prompt_width)
        self.position_ids.copy_(batch.positions)
        self.write_position.fill_(capacity - 1)
        self.graph = None
        if not capture:
            self._forward()
            fix_cache_shapes(cache, self.write_position)
            return
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(side):
            self._forward()
        current.wait_stream(side)
        fix_cache_shapes(cache, self.write_position)  # zeroes every position after the prompts again
        torch.cuda.synchronize(device)
        # Captured by hand rather than with `torch.cuda.graph`, which empties the allocator's cache first (the
        # training step after sampling would allocate it all again) and, when a capture fails, leaves its capture
        # stream as the current one: here the stream is restored whatever happens.
        graph = torch.cuda.CUDAGraph()
        capture_stream = torch.cuda.Stream(device)
        capture_stream.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(capture_stream):
            graph.capture_begin()
            try:
                self.logits = self._forward()  # records the kernels; nothing runs
            finally:
                graph.capture_end()
        current.wait_stream(capture_stream)
        self.graph = graph

    def _forward(self) -> Tensor:
        return self.model(**self.inputs).logits[:, -1]

    def _set_mask(self, attention_mask: Tensor, length: int) -> None:
        self.attention[:, 0, 0, :length] = torch.where(attention_mask[:, :length] != 0, 0.0, self.masked)

    def __call__(self, last_tokens: Tensor, positions: Tensor, attention_mask: Tensor, length: int) -> Tensor:
        """The next-token logits (N, V) of every row after feeding `last_tokens` (N, 1) at `positions` (N, 1), with
        `attention_mask[:, :length]` (N, >= length) over the cache; the new keys go to position length - 1. The
        returned tensor is overwritten by the next call."""
        self.input_ids.copy_(last_tokens)
        self.position_ids.copy_(positions)
        self._set_mask(attention_mask, length)
        self.write_position.fill_(length - 1)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


# Attention implementations that take an additive 4-D mask as it is (flash-attention and flex attention do not).
MASKED_ATTENTION = ("sdpa", "eager")
# Fewer decoding steps than this do not repay a capture (a warm-up step, a capture, a synchronisation).
MIN_GRAPH_STEPS = 8
# Set after a capture fails in this process: later calls decode without trying again (the warning said why once).
_capture_failed = False


def decoding_mode(model: nn.Module, device: torch.device, cuda_graph: bool, cache, max_new_tokens: int,
                  sharded: bool) -> str:
    """How `generate` runs its decoding steps: "graph" (`FixedShapeStep` captured as a CUDA graph) on a GPU when
    asked and possible, else "dynamic" (one forward call per step, finished rows dropped from the batch).

    Not captured: a model sharded over processes (every forward gathers weights: collectives), one under an enabled
    CUDA autocast (its cast weights are cached outside the graph's memory), an attention implementation that would
    not take the additive mask as it is, a cache whose layers cannot take fixed shapes (sliding-window layers),
    fewer than `MIN_GRAPH_STEPS` steps, and any call after a capture failed in this process. `sharded`: the model's
    forward passes are collectives. The CPU tests replace this function (as `generation.decoding_mode`) to run
    "fixed" (the fixed-shape step without a graph)."""
    if not cuda_graph or device.type != "cuda" or _capture_failed or max_new_tokens < MIN_GRAPH_STEPS:
        return "dynamic"
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention not in MASKED_ATTENTION or not can_fix_shapes(cache):
        return "dynamic"
    if sharded or torch.is_autocast_enabled("cuda"):
        return "dynamic"
    return "graph"


def fixed_shape_step(model: nn.Module, cache, batch, capacity: int, extra: dict, mode: str) -> FixedShapeStep | None:
    """The `FixedShapeStep` of `mode` ("graph": captured, "fixed": not), or None for the ordinary loop ("dynamic",
    or a capture that failed: the warning says why, once)."""
    global _capture_failed
    if mode == "dynamic":
        return None
    try:
        return FixedShapeStep(model, cache, batch, capacity, extra, capture=mode == "graph")
    except Exception as error:  # any failure to capture falls back to the loop that needs no graph
        if mode != "graph":
            raise
        # Nothing was written within the cache's filled positions (the warm-up writes after them; a capture only
        # records), so the ordinary loop goes on from the same cache.
        release_cache_shapes(cache)
        _capture_failed = True
        cause = f"; first {type(error.__context__).__name__}: {error.__context__}" if error.__context__ else ""
        warnings.warn(f"generate: the decoding step could not be captured as a CUDA graph ({type(error).__name__}: "
                      f"{error}{cause}); decoding one call at a time from now on", RuntimeWarning, stacklevel=3)
        return None
