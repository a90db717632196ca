"""CUDA-graph decoding: one graph replay per generated token instead of ~10 kernel launches per layer from Python.

A linearized model's decode step has static shapes and addresses: the recurrent state, the window rings, the sink
buffers and ``pos`` are updated in place by the one-launch decode kernel (``models/cache.py``), so the whole
one-token forward (embedding, every layer, the last norm and the LM head) can be captured once and replayed.
:class:`DecodeGraph` keeps the captured step with its static input buffers (token ids, positions) and its static
output (logits), and does after each replay the host-side bookkeeping the captured Python cannot repeat (each
layer's token count).

When it applies (:func:`graph_ready`): CUDA, no autograd, one new token per sequence, a :class:`LinearizedCache`
whose every layer is recurrent (a softmax layer's KV cache grows: not capturable), every layer already holds a
state and all its sinks, and no padding mask among the window's keys. The first decode step of a cache runs
eagerly (it compiles the kernels); once the cache tensors sit at the same addresses as the step before (beam
search reorders them every step, so it stays eager), one step warms up on the static buffers and the capture's
stream, and the next is captured and replayed. Anything else runs the eager step, which computes the same tokens;
so does a cache whose capture failed (one warning per model).

Off switch: ``model.cuda_graphs = False`` or the environment variable ``LINEARIZE_CUDA_GRAPHS=0``.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from linearize.models.cache import LinearizedCache, RecurrentStateLayer


def graphs_enabled(model: Any) -> bool:
    """The model's switch and the environment's (``LINEARIZE_CUDA_GRAPHS=0`` turns graphs off everywhere)."""
    return bool(getattr(model, "cuda_graphs", True)) and os.environ.get("LINEARIZE_CUDA_GRAPHS", "1") != "0"


def _layers(cache: LinearizedCache) -> list[RecurrentStateLayer] | None:
    layers = list(cache.layers)
    return layers if all(isinstance(layer, RecurrentStateLayer) for layer in layers) else None


def graph_ready(cache: Any, input_ids: Tensor | None, key_mask: Tensor | None, *, require_cuda: bool = True) -> bool:
    """Whether this forward is a decode step the graph can take (see the module docstring)."""
    if not isinstance(cache, LinearizedCache) or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return False
    if key_mask is not None or torch.is_grad_enabled() or (require_cuda and not input_ids.is_cuda):
        return False
    layers = _layers(cache)
    return bool(layers) and all(layer.has_state() and layer.sinks_filled >= layer.sinks and
                                layer.pos is not None and layer.pos.shape[0] == input_ids.shape[0]
                                for layer in layers)


def _addresses(cache: LinearizedCache) -> tuple:
    """Data pointers of every tensor the step reads or writes in place: a graph is valid while they stay put."""
    ptrs = []
    for layer in cache.layers:
        for t in (*layer.state(), layer.k_ring, layer.v_ring, layer.fk_ring, layer.pos, layer.sink_k, layer.sink_v,
                  layer.sink_pos):
            ptrs.append(None if t is None else (t.data_ptr(), tuple(t.shape)))
    return tuple(ptrs)


class DecodeGraph:
    """The captured one-token step of one model on one cache.

    Args:
        step: ``step(input_ids, position_ids, cache_position) -> logits [B, 1, V]``, the eager decode forward.
        input_ids / position_ids / cache_position: the first call's inputs; they set the static buffers' shapes.
        capture: record a CUDA graph (False runs ``step`` on the static buffers: the CPU test of this code path).

    With ``capture``, the first call is a warm-up: the real step, eager, on the static buffers and on the stream the
    capture will use (PyTorch's recipe: lazy initialisations happen outside the capture); the second call captures
    the step and replays it; every later call replays it.
    """

    def __init__(self, step: Callable[[Tensor, Tensor, Tensor], Tensor], input_ids: Tensor, position_ids: Tensor,
                 cache_position: Tensor, cache: LinearizedCache, *, capture: bool = True):
        self.step = step
        self._cache = weakref.ref(cache)  # the cache owns this graph (decoding_state): no cycle, so that a dropped
        # cache frees its state and the graph's pool at once, not at the next garbage collection
        self.addresses = _addresses(cache)
        self.ids = input_ids.clone()
        self.position_ids = position_ids.clone()
        self.cache_position = cache_position.clone()
        self.capture = capture
        self.stream = torch.cuda.Stream(device=input_ids.device) if capture else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.replays = 0
        """Calls through the static buffers (warm-up and capture included)."""

    @property
    def cache(self) -> LinearizedCache | None:
        return self._cache()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def valid_for(self, cache: LinearizedCache, input_ids: Tensor) -> bool:
        return cache is self.cache and input_ids.shape == self.ids.shape and _addresses(cache) == self.addresses

    def __call__(self, input_ids: Tensor, position_ids: Tensor, cache_position: Tensor) -> Tensor:
        """One decode step: new inputs into the static buffers, then warm-up, capture or replay (or, without
        ``capture``, the step itself); host counts advanced; returns a copy of the logits (the static buffer is
        overwritten by the next step).

        Raises:
            RuntimeError: the capture failed (the step's host counts are then as before the call).
        """
        self.ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.cache_position.copy_(cache_position)
        if not self.capture:
            self.logits = self.step(self.ids, self.position_ids, self.cache_position)
        elif self.replays == 0:  # warm-up: the real step, eager, on the capture's stream
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.logits = self.step(self.ids, self.position_ids, self.cache_position)
            torch.cuda.current_stream().wait_stream(self.stream)
        elif self.graph is None:
            counts = [layer.cumulative_length for layer in self.cache.layers]
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    # the captured Python runs once, now: it advances each layer's host count by one, this step's;
                    # the kernels (pos += 1 included) run at every replay, the first one just below
                    self.logits = self.step(self.ids, self.position_ids, self.cache_position)
            except RuntimeError:
                for layer, n in zip(self.cache.layers, counts):  # no kernel of this step ran
                    layer.cumulative_length = n
                raise
            self.graph = graph
            self.graph.replay()
        else:
            self.graph.replay()
            for layer in self.cache.layers:
                layer.cumulative_length += 1
        self.replays += 1
        return self.logits.clone()


class GraphedDecoding:
    """Per-cache decision state: the last step's addresses (use the static buffers once they are stable) and the
    graph."""

    def __init__(self) -> None:
        self.graph: DecodeGraph | None = None
        self.last_addresses: tuple | None = None
        self.eager_steps = 0
        self.failed = False

    def run(self, cache: LinearizedCache, input_ids: Tensor, position_ids: Tensor, cache_position: Tensor,
            step: Callable[[Tensor, Tensor, Tensor], Tensor], *, capture: bool = True) -> Tensor:
        if self.graph is not None and not self.graph.valid_for(cache, input_ids):
            self.graph = None
        if self.graph is None:
            addresses = _addresses(cache)
            if self.failed or self.eager_steps < 1 or addresses != self.last_addresses:
                self.eager_steps += 1
                self.last_addresses = addresses
                return step(input_ids, position_ids, cache_position)
        try:
            if self.graph is None:
                self.graph = DecodeGraph(step, input_ids, position_ids, cache_position, cache, capture=capture)
            return self.graph(input_ids, position_ids, cache_position)
        except RuntimeError as e:  # something in the forward cannot be captured: stay eager for this cache
            self.graph = None
            self.failed = True
            hint = (" (a model loaded with attn_implementation='eager' builds its attention mask with a host-to-device "
                    "copy, which no graph can hold: load it with 'sdpa', transformers' default)"
                    if "between CPU and CUDA" in str(e) else "")
            warnings.warn(f"CUDA-graph capture of the decode step failed, decoding eagerly: {e}{hint}", stacklevel=2)
            self.eager_steps += 1
            return step(input_ids, position_ids, cache_position)


def decoding_state(cache: LinearizedCache, model: Any = None) -> GraphedDecoding:
    """The cache's :class:`GraphedDecoding` (made on first use; it lives and dies with the cache). With ``model``, a
    capture that failed once for that model is not tried again on its later caches (one warning, not one per
    ``generate()`` call)."""
    state = cache.__dict__.get("_graphed_decoding")
    if state is None:
        state = cache.__dict__["_graphed_decoding"] = GraphedDecoding()
        if model is not None and model.__dict__.get("_graph_capture_failed"):
            state.failed = True
    return state


def note_failure(model: Any, state: GraphedDecoding) -> None:
    """Remember on ``model`` that its decode step could not be captured (see :func:`decoding_state`)."""
    if state.failed:
        model.__dict__["_graph_capture_failed"] = True


__all__ = ["DecodeGraph", "GraphedDecoding", "decoding_state", "graph_ready", "graphs_enabled", "note_failure"]
