"""A KV cache sized once for a whole rollout.

Shape legend: B batch, H key/value heads, T cached positions, D head dimension.

``DynamicCache`` grows each layer's keys and values with ``torch.cat``, which copies the whole cache at every decoding
step (quadratic in the sequence length, plus a fresh allocation per layer per step). Generation knows its final length
up front (prompt + ``max_new_tokens``), so :class:`RolloutCache` allocates every layer's buffers once, on the layer's
first update, and writes each step's states in place; attention receives views of the filled part, so models see
exactly what a ``DynamicCache`` would give them.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in (B, H, capacity, D) buffers; ``keys`` / ``values`` are views of the first T."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.size(-1))
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.size(-1))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append (B, H, S, D) states in place; returns the (B, H, T, D) views of everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.size(-2)
        if end > self.capacity:
            raise RuntimeError(f"RolloutCache: {end} positions exceed the capacity of {self.capacity}")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep (or reorder) the batch rows ``beam_idx`` (A,), in new buffers: dropping finished rows frees memory."""
        if self.is_initialized:
            self.key_buffer = self.key_buffer.index_select(0, beam_idx)
            self.value_buffer = self.value_buffer.index_select(0, beam_idx)
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


class RolloutCache(DynamicCache):
    """A ``DynamicCache`` whose layers are :class:`PreallocatedLayer` s holding up to ``capacity`` positions.

    Only appending and selecting batch rows (``reorder_cache``) are supported, not cropping: it lives inside one
    ``generate`` call.

    Args:
        capacity: positions each layer can hold, the prompt length plus ``max_new_tokens``.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.layer_class_to_replicate = partial(PreallocatedLayer, capacity)
