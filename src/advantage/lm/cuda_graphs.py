"""Work captured once as a CUDA graph and replayed: speed machinery of sampling and of training passes on a GPU.

A small model's decoding step, or its forward and backward pass over a batch of a few hundred tokens, is hundreds
or thousands of small kernels launched one by one from Python, and on a GPU the launches, not the arithmetic, set
its time (benchmarks/lm_launches.py counts them). A CUDA graph replays them with one launch, provided that
everything the work reads and writes keeps its shape and address.

- Sampling: `FixedShapeStep` runs the decoding step on such buffers (with the cache's layers switched to fixed
  shapes by `kv_cache.fix_cache_shapes`), `decoding_mode` says when a graph is asked for and possible, and
  `fixed_shape_step` builds the step or, when the capture fails, warns once and lets `generate` run its ordinary loop.
- Training: `GraphedPasses` keeps one graph per shape of micro-batch (the batches padded to a few recurring widths)
  for a pass that computes a loss and its gradients, and replays it with the batch copied into its inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from advantage.lm.kv_cache import can_fix_shapes, fix_cache_shapes, release_cache_shapes


class FixedShapeStep:
    """One decoding step on buffers of fixed shapes, captured once as a CUDA graph and replayed at every step.

    On a GPU a small model's decoding step is hundreds of small kernels, each launched from Python (transformers'
    modules, then PyTorch's dispatcher): the launches, not the arithmetic, set its time. A CUDA graph records the
    step's kernels once and replays them with one launch. A graph replays the same kernels on the same memory, so
    everything the step reads or writes has a fixed shape and address: the N rows' last tokens and position ids, an
    attention mask over the whole cache (N, P + max_new_tokens), made additive inside the step (N, 1, 1, P +
    max_new_tokens; 0 where attended, the dtype's lowest value elsewhere), instead of the prefix seen so far, the
    cache's layers writing at a position held in a tensor (`kv_cache.PreallocatedLayer.fix_shapes`) and returning
    their whole buffers, and the logits. Finished rows therefore stay in the batch (they are fed the pad token with
    attention 0, as before, and change nothing).

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
        self.input_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.attention = torch.zeros((rows, capacity), dtype=batch.attention_mask.dtype, device=device)  # 1: attend
        # The additive mask's two values, as tensors: the mask is made inside the step (`_forward`), so that a graph
        # replays it instead of launching it each step, and a capture then meets no number to copy to the device.
        self.attended = torch.zeros((), dtype=dtype, device=device)
        self.masked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.write_position = torch.zeros(1, dtype=torch.long, device=device)
        if not fix_cache_shapes(cache, self.write_position):
            raise RuntimeError("the model's key-value cache cannot take fixed shapes")
        self.inputs = {**extra, "input_ids": self.input_ids, "position_ids": self.position_ids}
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
        if device not in _decoding_graphs:
            _decoding_graphs[device] = _DecodingGraphs(device)
        shared = _decoding_graphs[device]
        current = torch.cuda.current_stream(device)
        shared.side_stream.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(shared.side_stream):
            self._forward()
        current.wait_stream(shared.side_stream)
        fix_cache_shapes(cache, self.write_position)  # zeroes every position after the prompts again
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        self.logits = record(graph, device, shared.capture_stream, shared.pool,
                             self._forward)  # records the kernels; nothing runs
        self.graph = shared.last_graph = graph

    def _forward(self) -> Tensor:
        # A 4-D mask goes to the attention as it is: transformers builds no mask of its own (no host sync).
        additive = torch.where(self.attention[:, None, None, :] != 0, self.attended, self.masked)  # (N, 1, 1, C)
        return self.model(**self.inputs, attention_mask=additive).logits[:, -1]

    def _set_mask(self, attention_mask: Tensor, length: int) -> None:
        self.attention[:, :length].copy_(attention_mask[:, :length])  # later columns stay 0 (not attended)

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


class _DecodingGraphs:
    """What every decoding-step graph of the process shares on one device: a side stream for the warm-ups, a capture
    stream and a memory pool, and the last graph captured.

    `generate` captures a new graph per call (its shapes change from call to call). A fresh pool per graph would be
    left to the allocator when its graph goes, holding its memory until an allocation fails; one pool for them all
    reuses it, provided that the captures run on one stream (the allocator reuses memory on the stream that freed
    it). A pool that no graph uses any more cannot be captured into again (the allocator asserts as much): the last
    graph is kept until the next one has been captured (it holds no tensor; its temporaries are the next graph's)."""

    def __init__(self, device: torch.device):
        self.side_stream = torch.cuda.Stream(device)
        self.capture_stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.last_graph: torch.cuda.CUDAGraph | None = None


_decoding_graphs: dict[torch.device, _DecodingGraphs] = {}


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
        _decoding_graphs.pop(batch.attention_mask.device, None)  # its pool: freeable once its last graph is gone
        cause = f"; first {type(error.__context__).__name__}: {error.__context__}" if error.__context__ else ""
        warnings.warn(f"generate: the decoding step could not be captured as a CUDA graph ({type(error).__name__}: "
                      f"{error}{cause}); decoding one call at a time from now on", RuntimeWarning, stacklevel=3)
        return None


class GraphedPasses:
    """Passes of recurring shapes (forward, loss, backward: `compute(inputs)`), each shape captured once as a CUDA
    graph and replayed.

    A training step of a small model on a GPU is thousands of kernel launches for a few milliseconds of arithmetic.
    Replayed as a graph it is one. A graph replays the same kernels on the same memory, so each shape of input gets
    its own graph with its own input buffers (the callers pad their batches to a few recurring widths). The
    gradients each pass computes are copied, inside the graph, into one set of gradient buffers that every shape's
    graph shares, and become the parameters' `.grad` after each replay: the graphs' own memory (one pool for all of
    them) then holds only what a pass needs while it runs. The parameters' gradients must be None before each pass
    (one micro-batch an optimizer step, gradients zeroed with `set_to_none=True`, as `LMSession` does); otherwise
    the pass runs as it is.

    The first pass of a shape runs for real (on a side stream, the warm-up CUDA graphs ask for) and gives that
    micro-batch's results; it is then captured (a capture records, nothing runs) for the next passes of that shape.
    `capture=False` runs every later pass on the same input buffers and gradient buffers without a graph: what the
    CPU tests check against ordinary passes, so that only the capture itself is left to a GPU. When a capture
    fails, a warning says why (once) and every later pass runs as an ordinary one.

    Args:
        parameters: the model's parameters; those that require a gradient get one from each pass (none: passes
            without gradients, such as a reference model's).
        capture: capture graphs (on a GPU) or run the passes as they are.
    """

    def __init__(self, parameters, capture: bool):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.capture = capture
        self.graphs: dict[tuple, _GraphedPass] = {}
        self.gradients: list[Tensor] | None = None  # allocated at the first capture, outside every graph's memory
        self.failed = False
        # One memory pool for every shape's graph: they never run at once, and each replay writes what it later
        # reads (its temporaries, its outputs) before reading it. Input and gradient buffers are outside the pool.
        # One side stream for the first passes and one for the captures: the allocator reuses the memory it caches
        # on a stream for that stream only.
        self.pool = self.side_stream = self.capture_stream = None

    def __call__(self, inputs: dict[str, Tensor], compute: Callable[[dict[str, Tensor]], tuple[Tensor, ...]]
                 ) -> tuple[Tensor, ...]:
        """`compute(inputs)`'s detached outputs and its gradients in `.grad`, from the graph of these shapes.

        `compute` takes tensors of the shapes of `inputs`, calls `backward()` on its loss (if it has gradients),
        reads no value back to the host and returns its outputs (a tuple of tensors)."""
        key = self.shape_key(inputs)
        graphed = self.graphs.get(key)
        ordinary = self.failed or any(p.grad is not None for p in self.parameters)
        if ordinary or (graphed is None and len(self.graphs) >= MAX_TRAINING_GRAPHS):
            return tuple(output.detach() for output in compute(inputs))
        if graphed is None:
            graphed = self.graphs[key] = _GraphedPass({name: tensor.clone() for name, tensor in inputs.items()})
            outputs = self._first_pass(graphed, compute)
            if self.capture:
                self._capture(graphed, compute)
            return outputs
        for name, tensor in inputs.items():
            graphed.inputs[name].copy_(tensor, non_blocking=True)
        if graphed.graph is None:
            outputs = self._recorded(graphed, compute)
        else:
            graphed.graph.replay()
            outputs = tuple(output.clone() for output in graphed.outputs)  # the next replay overwrites them
        for parameter, gradient, computed in zip(self.parameters, self.gradients, graphed.computed):
            parameter.grad = gradient if computed else None
        return outputs

    @staticmethod
    def shape_key(inputs: dict[str, Tensor]) -> tuple:
        """What tells one graph from another: the inputs' names, shapes, dtypes and devices."""
        return tuple((name, tuple(tensor.shape), tensor.dtype, tensor.device) for name, tensor in inputs.items())

    def _recorded(self, graphed: _GraphedPass, compute) -> tuple[Tensor, ...]:
        """What a capture records: the pass on the shape's input buffers, its gradients copied into the shared
        gradient buffers (the pass's own are freed: the next shape's graph reuses their memory)."""
        if self.gradients is None:
            self.gradients = [torch.empty_like(parameter) for parameter in self.parameters]
        outputs = tuple(output.detach() for output in compute(graphed.inputs))
        produced = [parameter.grad for parameter in self.parameters]
        graphed.computed = [gradient is not None for gradient in produced]
        pairs = [(shared, gradient) for shared, gradient in zip(self.gradients, produced) if gradient is not None]
        if pairs:
            torch._foreach_copy_([shared for shared, _ in pairs], [gradient for _, gradient in pairs])
        for parameter in self.parameters:
            parameter.grad = None
        return outputs

    def _first_pass(self, graphed: _GraphedPass, compute) -> tuple[Tensor, ...]:
        """The shape's first pass, for real: on a side stream when a capture follows (its lazy initialisations)."""
        if not self.capture:
            return tuple(output.detach() for output in compute(graphed.inputs))
        device = next(iter(graphed.inputs.values())).device
        current = torch.cuda.current_stream(device)
        self.side_stream = self.side_stream or torch.cuda.Stream(device)
        self.side_stream.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(self.side_stream):
            outputs = tuple(output.detach() for output in compute(graphed.inputs))
        current.wait_stream(self.side_stream)
        return outputs

    def _capture(self, graphed: _GraphedPass, compute) -> None:
        """Record `compute` on the shape's input buffers; the first pass's gradients stay this step's."""
        device = next(iter(graphed.inputs.values())).device
        first = [p.grad for p in self.parameters]
        for parameter in self.parameters:
            parameter.grad = None  # so that the captured backward allocates its gradients in the graph's memory
        try:
            if self.gradients is None:
                self.gradients = [torch.empty_like(parameter) for parameter in self.parameters]
            torch.cuda.synchronize(device)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            self.capture_stream = self.capture_stream or torch.cuda.Stream(device)
            graph = torch.cuda.CUDAGraph()
            outputs = record(graph, device, self.capture_stream, self.pool, lambda: self._recorded(graphed, compute))
            graphed.graph, graphed.outputs = graph, outputs
        except Exception as error:  # any failure to capture: ordinary passes from now on
            self.failed = True
            self.graphs.clear()
            warnings.warn(f"a training pass could not be captured as a CUDA graph ({type(error).__name__}: {error}); "
                          "running the passes one kernel at a time from now on", RuntimeWarning, stacklevel=3)
        finally:
            for parameter, gradient in zip(self.parameters, first):
                parameter.grad = gradient


def record(graph: torch.cuda.CUDAGraph, device: torch.device, stream: torch.cuda.Stream, pool, work: Callable):
    """`work()`'s kernels recorded into `graph` on `stream` (nothing runs), its memory taken from `pool` (a
    `torch.cuda.graph_pool_handle()` or another graph's `pool()`); returns what `work` returned.

    By hand rather than with `torch.cuda.graph`, which empties the allocator's cache before each capture (the next
    training step would allocate it all again) and leaves its capture stream current when a capture fails. When the
    capture fails, `capture_end` raises before it tells the allocator that the capture is over, and every later
    allocation of the process would go on as if a capture were running (no memory freed to retry an allocation,
    `empty_cache` failing): so the allocator is told here, and the pool's share of this capture released. The
    graph object of a failed capture is then kept for the life of the process: whether its destructor would release
    the pool a second time (which aborts the process) depends on how far `capture_end` got and on the PyTorch
    version. A failed capture also leaves PyTorch's default CUDA random generator in capture mode (every later
    dropout outside a graph would fail): one trivial capture is made to end it."""
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device), torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        ended = False
        try:
            try:
                result = work()
            finally:
                graph.capture_end()
                ended = True  # from here on the graph releases its memory itself
        except BaseException:
            if not ended:
                try:
                    torch.cuda.memory._cuda_endAllocateToPool(index, pool)
                except RuntimeError:  # capture_end got as far as telling it
                    pass
                torch.cuda.memory._cuda_releasePool(index, pool)
                _failed_graphs.append(graph)
                _end_generator_capture(device, stream)
            raise
    current.wait_stream(stream)
    return result


# The graphs of failed captures, never destroyed (see `record`): at most one per kind of capture in a process, since
# a failure turns that kind of capture off.
_failed_graphs: list = []


def _end_generator_capture(device: torch.device, stream: torch.cuda.Stream) -> None:
    """Take PyTorch's default CUDA generator out of the capture mode a failed capture left it in: a capture that
    ends normally does (one addition, in a pool of its own). Best effort: if even that fails, only random operations
    outside graphs (dropout) are affected, and they say so."""
    try:
        scratch = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.stream(stream):
            graph.capture_begin()
            scratch.add_(1.0)
            graph.capture_end()
    except Exception:  # nothing more to do on a failure path
        pass


class _GraphedPass:
    """One shape's input buffers, which parameters its pass gives a gradient, and once captured its graph and
    outputs."""

    def __init__(self, inputs: dict[str, Tensor]):
        self.inputs = inputs
        self.computed: list[bool] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[Tensor, ...] = ()


def training_graphs(model: nn.Module, device: torch.device, cuda_graph: bool, *, sharded: bool, world_size: int,
                    micro_batches: int, checkpointing: bool, autocast: bool) -> GraphedPasses | None:
    """`GraphedPasses` for a stage's training passes on `model` when asked for and possible, else None.

    Not graphed: a CPU, a model sharded or data parallel over processes (the gradients are exchanged between passes
    and steps), several micro-batches an optimizer step (a replay writes its gradients, it does not add them),
    activation checkpointing (its recomputation saves and restores random states), autocast (its cast weights are
    cached outside the graph's memory), and an attention implementation that would not take the packed rows'
    additive mask as it is."""
    if not cuda_graph or device.type != "cuda" or sharded or world_size > 1 or micro_batches > 1 or checkpointing \
            or autocast:
        return None
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)  # a ScalarHeadModel: its body's
    if attention not in MASKED_ATTENTION:
        return None
    return GraphedPasses(model.parameters(), capture=True)


# Shapes of micro-batch kept as graphs at most (each keeps its input buffers and a capture of its own in the shared
# pool; more shapes than a data set's few padded widths would mean capturing for little reuse); others run as they are.
MAX_TRAINING_GRAPHS = 8
# Packed rows (and answers) are padded to a multiple of this many columns when their passes are graphed, so that a
# data set's batches fall into a few shapes. Answers less: every answer slot goes through the model's head.
GRAPH_WIDTH_MULTIPLE = 32
GRAPH_ANSWER_WIDTH_MULTIPLE = 8


def padding_multiples(graphed: bool) -> tuple[int, int]:
    """The multiples a batch's packed rows and answers are padded to (`collate_shared_prompt`): recurring widths
    when its passes are graphed, none otherwise."""
    return (GRAPH_WIDTH_MULTIPLE, GRAPH_ANSWER_WIDTH_MULTIPLE) if graphed else (1, 1)
