"""A key-value cache whose layers write into preallocated buffers: speed machinery of `generation.generate`.

transformers' `DynamicLayer` concatenates every decoding step's keys and values to all the earlier ones, copying the
whole cache at each step (quadratic in the length, and most of the time of a small model's decode step on a CPU).
The layers here copy only the step's own keys into buffers sized for the longest sequence, and keep the interface
`DynamicCache` promises, so the model's forward pass does not know the difference. `generate` is its one caller.
For a CUDA graph of the decoding step the layers can switch to fixed shapes (`fix_cache_shapes`): each step's keys
are written at a position held in a tensor and the whole buffers are returned.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def _preallocated_layer_class():
    """`PreallocatedLayer`, defined on first use so that importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` that writes new keys and values into buffers with room for `capacity` positions.

        transformers' `DynamicLayer` concatenates every step's keys to all the earlier ones, copying the whole cache
        at each step (quadratic in the length; most of the time of a small model's decode step). Here a step copies
        only its own keys; `keys` and `values` stay what `DynamicLayer` promises, the (batch, heads, length, dim)
        states seen so far, as views of the buffers. A buffer that fills up is doubled (not expected: `generate`
        sizes it for the longest sequence).
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.write_position: Tensor | None = None  # set by `fix_shapes`

        def fix_shapes(self, write_position: Tensor) -> None:
            """From now on, write each step's keys at the position held in `write_position` ((1,) long, on the
            buffers' device, set before each step) and return the whole buffers (fixed shapes, no host
            synchronisation: what a CUDA graph of the step needs). Positions not yet written are zeros, and the
            attention mask has to leave them out. The buffers are never reallocated afterwards."""
            length = self.keys.shape[2]
            self.key_buffer[:, :, length:].zero_()  # masked out, but 0 x NaN would still be NaN
            self.value_buffer[:, :, length:].zero_()
            self.write_position = write_position

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[3])
            self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[3])
            self._expose(0)

        def _expose(self, length: int) -> None:
            self.keys = self.key_buffer[:, :, :length]
            self.values = self.value_buffer[:, :, :length]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if self.write_position is not None:
                self.key_buffer.index_copy_(2, self.write_position, key_states)
                self.value_buffer.index_copy_(2, self.write_position, value_states)
                return self.key_buffer, self.value_buffer
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[2]
            end = start + key_states.shape[2]
            if end > self.key_buffer.shape[2]:
                room = max(end, 2 * self.key_buffer.shape[2]) - self.key_buffer.shape[2]
                self.key_buffer = torch.cat([self.key_buffer, self.key_buffer.new_empty(
                    *self.key_buffer.shape[:2], room, self.key_buffer.shape[3])], dim=2)
                self.value_buffer = torch.cat([self.value_buffer, self.value_buffer.new_empty(
                    *self.value_buffer.shape[:2], room, self.value_buffer.shape[3])], dim=2)
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self._expose(end)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
            if self.is_initialized and tokens_to_remove < 0:
                self._expose(max(0, self.keys.shape[2] + tokens_to_remove))

        def _select_rows(self, index: Tensor) -> None:
            if self.write_position is not None:
                raise RuntimeError("a cache with fixed shapes keeps its rows (a CUDA graph reads these buffers)")
            if self.is_initialized:  # copies the filled positions only
                index = index.to(self.key_buffer.device)
                self.key_buffer = self._selected(self.key_buffer, self.keys, index)
                self.value_buffer = self._selected(self.value_buffer, self.values, index)
                self._expose(self.keys.shape[2])

        @staticmethod
        def _selected(buffer: Tensor, filled: Tensor, index: Tensor) -> Tensor:
            selected = buffer.new_empty(len(index), *buffer.shape[1:])
            selected[:, :, :filled.shape[2]] = filled.index_select(0, index)
            return selected

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                rows = torch.arange(self.key_buffer.shape[0], device=self.key_buffer.device)
                self._select_rows(rows.repeat_interleave(repeats))

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                rows = torch.arange(self.key_buffer.shape[0], device=self.key_buffer.device)
                self._select_rows(rows[indices.to(rows.device) if isinstance(indices, Tensor) else indices])

        def reorder_cache(self, beam_idx: Tensor) -> None:
            self._select_rows(beam_idx)

        def reset(self) -> None:
            super().reset()
            self.key_buffer = self.value_buffer = None

    return PreallocatedLayer


def can_fix_shapes(cache) -> bool:
    """True when every layer of `cache` is a `PreallocatedLayer` (not the model's own cache, kept for sliding-window
    or linear-attention layers), so that `fix_cache_shapes` can switch them to fixed shapes."""
    layer_class = _preallocated_layer_class()
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is layer_class for layer in layers)


def fix_cache_shapes(cache, write_position: Tensor) -> bool:
    """Switch every layer of a filled `key_value_cache` to fixed shapes (`PreallocatedLayer.fix_shapes`); False,
    leaving the cache as it is, when `can_fix_shapes` says no or a layer holds nothing yet."""
    if not can_fix_shapes(cache) or not all(layer.is_initialized for layer in cache.layers):
        return False
    for layer in cache.layers:
        layer.fix_shapes(write_position)
    return True


def release_cache_shapes(cache) -> None:
    """Undo `fix_cache_shapes`: the layers write and expose the filled positions again, as before."""
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "write_position", None) is not None:
            layer.write_position = None


def key_value_cache(model: nn.Module, capacity: int):
    """A `transformers.DynamicCache` for `model` whose layers have room for `capacity` positions (no re-copying).

    Falls back to the model's ordinary `DynamicCache` when some layer is not a plain full-attention `DynamicLayer`
    (sliding-window or linear-attention layers keep their own bookkeeping).
    """
    from transformers import DynamicCache

    try:
        from transformers.cache_utils import DynamicLayer
        cache = DynamicCache(config=model.config)
    except (ImportError, TypeError):  # transformers before per-layer caches: its plain cache, copying at each step
        return DynamicCache()
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        layer_class = _preallocated_layer_class()
        cache.layers = [layer_class(capacity) for _ in cache.layers]
    return cache
