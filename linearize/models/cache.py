"""Constant-size generation cache, built on transformers' own cache layers.

Per layer, one of:
- ``HybridStateLayer`` (window > 0): transformers' ``LinearAttentionAndSlidingWindowAttentionLayer``; the
  sliding part keeps the last ``W - 1`` raw keys/values, the linear part two recurrent tensors, S [B, Hs, F, D]
  and z [B, Hs, F], both fp32.
- ``LinearStateLayer`` (window == 0): transformers' ``LinearAttentionLayer`` plus a token counter, so
  ``get_seq_length`` (which transformers uses for positions) works even when no layer is softmax.
- ``DynamicLayer`` for layers that kept softmax attention.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionLayer,
)
from transformers.cache_utils import Cache

_S, _Z = 0, 1  # recurrent state slots


class _StateMixin:
    """Accessors shared by both linear layer kinds (state slots 0 = S, 1 = z)."""

    def has_state(self) -> bool:
        return bool(self.is_recurrent_states_initialized[_S])

    def state(self) -> tuple[Tensor, Tensor]:
        return self.recurrent_states[_S], self.recurrent_states[_Z]

    def set_state(self, state: tuple[Tensor, Tensor]) -> None:
        self.update_recurrent_state(state[0].float(), _S)
        self.update_recurrent_state(state[1].float(), _Z)

    def nbytes(self) -> int:
        total = 0
        for t in list(self.recurrent_states.values()) + [getattr(self, "keys", None), getattr(self, "values", None)]:
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
        return total


class HybridStateLayer(_StateMixin, LinearAttentionAndSlidingWindowAttentionLayer):
    def __init__(self, sliding_window: int):
        if sliding_window < 2:
            raise ValueError("hybrid cache needs window >= 2")
        super().__init__(sliding_window=sliding_window, number_of_states=2)


class LinearStateLayer(_StateMixin, LinearAttentionLayer, CacheLayerMixin):
    """Recurrent state only; counts tokens so positions keep advancing."""

    is_sliding = False

    def __init__(self):
        LinearAttentionLayer.__init__(self, number_of_states=2)
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.cumulative_length += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        self.cumulative_length = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        LinearAttentionLayer.lazy_initialization(self, **kwargs)


class LinearizedCache(DynamicCache):
    """A ``DynamicCache`` whose layers follow the linearized model's layout."""

    def __init__(self, window: int, num_layers: int, softmax_layers: list[int] | tuple[int, ...] = ()):
        layers = []
        for i in range(num_layers):
            if i in softmax_layers:
                layers.append(DynamicLayer())
            elif window > 0:
                layers.append(HybridStateLayer(window))
            else:
                layers.append(LinearStateLayer())
        Cache.__init__(self, layers=layers)

    def nbytes(self) -> int:
        """Bytes held by every cached tensor (recurrent states, window keys/values, softmax KV)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, _StateMixin):
                total += layer.nbytes()
            elif layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total


def cache_bytes_per_sequence(
    *, linear_layers: int, num_state_heads: int, num_kv_heads: int, feature_dim: int, head_dim: int, window: int,
    dtype_bytes: int = 2,
) -> tuple[int, int]:
    """(recurrent state bytes, window bytes) one sequence holds once the window is full, over the linear layers:
    fp32 S [F, D] and z [F] per state head, plus the last ``W - 1`` keys and values per kv head in the model dtype."""
    state = linear_layers * num_state_heads * (feature_dim * head_dim + feature_dim) * 4
    win = linear_layers * 2 * num_kv_heads * max(window - 1, 0) * head_dim * dtype_bytes
    return state, win


__all__ = ["HybridStateLayer", "LinearStateLayer", "LinearizedCache", "cache_bytes_per_sequence"]
