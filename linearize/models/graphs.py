"""CUDA-graph decoding: one graph replay per generated token instead of ~10 kernel launches per layer from Python.

A linearized model's decode step has static shapes and addresses: the recurrent state, the window rings, the sink
buffers and ``pos`` are updated in place by the one-launch decode kernel (``models/cache.py``), and a kept softmax
layer's KV buffer (``SoftmaxKVLayer``) is written in place at the device-side position and read only up to it
(``models/softmax.py``, ``kernels/softmax_decode``), so the whole one-token forward (embedding, every layer, the
last norm and the LM head) can be captured once and replayed.
:class:`DecodeGraph` keeps the captured step with its static input buffers (token ids, positions) and its static
output (logits), and does after each replay the host-side bookkeeping the captured Python cannot repeat (each
layer's token count).

When it applies (:func:`graph_ready`): CUDA, no autograd, one new token per sequence, a :class:`LinearizedCache`
whose every layer is recurrent or a kept softmax layer's ``SoftmaxKVLayer`` (a kept local layer's sliding cache,
or a ``DynamicLayer`` passed in, grows by concatenation: not capturable), every recurrent layer already holds a
state and all its sinks, no padding mask among the window's keys, and, with kept softmax layers, no padding at all
(their mask would be needed: such steps run the teacher's forward over the buffer, eagerly) and every kept layer's
module re-classed by ``models/softmax.py``. The first decode step of a cache runs eagerly (it compiles the
kernels); once the cache tensors sit at the same addresses as the step before (beam search reorders them every
step, so it stays eager), one step warms up on the static buffers and the capture's stream, and the next is
captured and replayed. Before every step, :func:`reserve_step` grows a full KV buffer (a replay cannot): the
buffer moves, the addresses differ, and that step runs eagerly and the graph is captured again (at least doubling
per move, so a generation re-captures a logarithmic number of times). Anything else runs the eager step, which
computes the same tokens; so does a cache whose capture failed (one warning per model); ``SoftmaxKVLayer.update``
refuses to run inside a capture, so a step that would take the teacher's path is never replayed.

Off switch: ``model.cuda_graphs = False`` or the environment variable ``LINEARIZE_CUDA_GRAPHS=0`` (or ``false``,
``off``, ``no``: :func:`linearize.env.env_flag`).

Compiled decode step (opt-in: ``model.compile_decode = True`` or ``LINEARIZE_COMPILE_DECODE=1``; ``=0`` turns it off
for every model). Even replayed from a graph, a step is ~40 small kernels per layer (RMSNorm, RoPE, residual adds,
SiLU * up, ...) of a few microseconds each. With ``compile_decode`` the step the graph captures is
:class:`CompiledDecode`: the same one-token forward through ``torch.compile`` (inductor, static shapes, one graph),
which fuses those ops. Not traced: each layer's linear attention against its cache (feature maps, our Triton decode
kernel, the cache's host counters) is one opaque op of the compiled graph, :func:`cached_linear_attention`, which
takes its cache layer from the running step; the traced forward gets no cache at all, so no token count (it changes
every step, and as a guard would make every step recompile) is ever read by traced code.

It applies where the graph does (the conditions above, ``cuda_graphs`` on), on caches of recurrent layers only (the
traced forward passes no cache, and the kept softmax layers have no opaque op yet: with them the graph holds the
uncompiled step). One compilation per batch size, reused
by every cache of the model (and by models of the same geometry); it happens at the first step of that batch size
(the eager first step of a cache), never in the captured step: the capture runs under
``torch.compiler.set_stance("fail_on_recompile")``, so a step that would compile there fails the capture (decoding
then runs uncaptured) instead. A failed compilation (no C++ compiler, an op inductor cannot take, a batch size past
dynamo's ``recompile_limit`` of 8 compilations) leaves the model on the uncompiled step, with one warning.

Measured (H200, SmolLM2-135M geometry, W=64 + 4 sinks, bf16; ``benchmarks/diagnoses/gpu_decode_profile.py``): the graph
step takes 3.52 -> 1.91 ms at batch 1 and 4.47 -> 3.00 ms at batch 64 with it (1,312 kernels per uncompiled step). It
stays opt-in because each new batch size pays a compilation at its first step, which ``generate()`` users do not
expect (its time is not measured yet).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from contextvars import ContextVar
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from linearize.env import env_flag
from linearize.errors import LinearizeError
from linearize.models.cache import LinearizedCache, RecurrentStateLayer, SoftmaxKVLayer


def graphs_enabled(model: Any) -> bool:
    """The model's switch and the environment's (``LINEARIZE_CUDA_GRAPHS=0`` / ``false`` / ``off`` / ``no`` turns
    graphs off everywhere)."""
    return bool(getattr(model, "cuda_graphs", True)) and bool(env_flag("LINEARIZE_CUDA_GRAPHS", True))


def _layers(cache: LinearizedCache) -> list[RecurrentStateLayer | SoftmaxKVLayer] | None:
    layers = list(cache.layers)
    return layers if all(isinstance(layer, (RecurrentStateLayer, SoftmaxKVLayer)) for layer in layers) else None


def _layer_ready(layer: RecurrentStateLayer | SoftmaxKVLayer, batch: int) -> bool:
    if isinstance(layer, SoftmaxKVLayer):
        return layer.is_initialized and layer.pos.shape[0] == batch
    return (layer.has_state() and layer.sinks_filled >= layer.sinks and layer.pos is not None
            and layer.pos.shape[0] == batch)


def graph_ready(cache: Any, input_ids: Tensor | None, key_mask: Tensor | None, *, require_cuda: bool = True,
                kept_softmax: bool = True) -> bool:
    """Whether this forward is a decode step the graph can take (see the module docstring). ``kept_softmax``: the
    model's decision that its kept softmax layers take their static decode step in this call (no padding, every
    kept module re-classed: ``LinearizedModelMixin._kept_softmax_step``); without it a cache with kept layers is not
    graphed."""
    if not isinstance(cache, LinearizedCache) or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return False
    if key_mask is not None or torch.is_grad_enabled() or (require_cuda and not input_ids.is_cuda):
        return False
    layers = _layers(cache)
    if not layers or not all(_layer_ready(layer, input_ids.shape[0]) for layer in layers):
        return False
    return kept_softmax or not any(isinstance(layer, SoftmaxKVLayer) for layer in layers)


def reserve_step(cache: LinearizedCache) -> None:
    """Make room in every static KV layer for the next token, before a step that may be replayed (a replay cannot
    reallocate; a reallocation moves the buffers, so the graph is captured again)."""
    for layer in cache.layers:
        if isinstance(layer, SoftmaxKVLayer):
            layer.reserve(layer.cumulative_length + 1)


def _addresses(cache: LinearizedCache) -> tuple:
    """Data pointers of every tensor the step reads or writes in place: a graph is valid while they stay put."""
    ptrs = []
    for layer in cache.layers:
        if isinstance(layer, SoftmaxKVLayer):
            tensors = layer.decode_buffers()
        else:
            tensors = (*(layer.state() or ()), layer.k_ring, layer.v_ring, layer.fk_ring, layer.pos, layer.sink_k,
                       layer.sink_v, layer.sink_pos, *(layer.global_set() or ()), layer.state_upto)
        for t in tensors:
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
                with _no_compilation(), torch.cuda.graph(graph, stream=self.stream):
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
        reserve_step(cache)  # a full static KV buffer grows now, outside the step (new addresses: no replay)
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


def _no_compilation() -> contextlib.AbstractContextManager:
    """A compiled step that would compile (a guard that no longer holds) raises a ``RuntimeError`` instead: no
    compilation may happen inside a capture (``torch.compiler.set_stance``, torch >= 2.6; nothing before)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


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


# -- compiled decode step ---------------------------------------------------------------------------------------
def compile_enabled(model: Any) -> bool:
    """The model's ``compile_decode`` switch, or the environment's where ``LINEARIZE_COMPILE_DECODE`` says on
    (``1``, ``true``, ...) or off (``0``, ``false``, ...)."""
    env = env_flag("LINEARIZE_COMPILE_DECODE", None)
    if env is not None:
        return env
    return bool(getattr(model, "compile_decode", False))


class _StepLayers:
    """What the compiled graph's attention ops read while one compiled step runs: layer index -> (the layer's
    linear attention module, its cache layer), and how many of them ran."""

    def __init__(self, layers: Mapping[int, tuple[nn.Module, RecurrentStateLayer]]):
        self.layers = layers
        self.calls = 0


_ACTIVE: ContextVar[_StepLayers | None] = ContextVar("linearize_compiled_decode_layers", default=None)


@torch.library.custom_op("linearize::cached_linear_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, int layer_idx, Tensor? q_phi=None, "
                                "Tensor? k_phi=None) -> Tensor")
def cached_linear_attention(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, q_phi: Tensor | None = None,
                            k_phi: Tensor | None = None) -> Tensor:
    """Layer ``layer_idx``'s linear attention against its layer of the cache of the running compiled step (q
    [B, H, 1, d], k/v [B, Hk, 1, d|D] -> o [B, H, 1, D], contiguous): ``HybridLinearAttention`` with ``cache_layer``,
    eager, as in the uncompiled step. ``q_phi, k_phi``: q and k before RoPE, for ``feature_input: unrotated``.

    An opaque op to ``torch.compile``: its inputs are tensors only, and the cache state it updates in place (the
    recurrent state, the rings, ``pos``, the host token count) is read by no other op of the graph, only by this
    layer's op at the next step, so the graph needs no view of it. Raises ``LinearizeError`` outside a compiled step.
    """
    active = _ACTIVE.get()
    if active is None:
        raise LinearizeError("linearize::cached_linear_attention runs inside a compiled decode step only "
                             "(models/graphs.py, CompiledDecode)")
    attn, layer = active.layers[layer_idx]
    active.calls += 1
    phi_in = None if q_phi is None else (q_phi, k_phi)
    return attn(q, k, v, cache_layer=layer, phi_in=phi_in).contiguous()


@cached_linear_attention.register_fake
def _cached_linear_attention_shape(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, q_phi: Tensor | None = None,
                                   k_phi: Tensor | None = None) -> Tensor:
    """The op's output as the compiler sees it while tracing: o [B, H, T, D] in ``v``'s dtype, contiguous."""
    return v.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


class CompiledDecode:
    """One model's compiled decode forward (the model keeps it; it holds no model and no cache).

    Args:
        forward: ``forward(model, input_ids, position_ids, cache_position) -> logits [B, 1, V]``, the one-token
            forward with each linear attention as :func:`cached_linear_attention` and no cache passed (so that the
            traced code reads no token count).
    """

    def __init__(self, forward: Callable[[Any, Tensor, Tensor, Tensor], Tensor]):
        self.forward = torch.compile(forward, dynamic=False, fullgraph=True)
        self.failed = False
        """Compilation failed once: this model decodes uncompiled from then on."""

    def __call__(self, model: Any, layers: Mapping[int, tuple[nn.Module, RecurrentStateLayer]], input_ids: Tensor,
                 position_ids: Tensor, cache_position: Tensor) -> Tensor | None:
        """The step's logits, or None where compilation failed (nothing of the step ran: the caller runs the
        uncompiled step). ``layers``: every layer's (linear attention, cache layer), for the attention ops."""
        if self.failed:
            return None
        active = _StepLayers(layers)
        token = _ACTIVE.set(active)
        try:
            return self.forward(model, input_ids, position_ids, cache_position)
        except _compile_errors() as e:
            if active.calls:  # layers already advanced their state: running the step again would do it twice
                raise
            self.failed = True
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # the exception that says why
            why = next((line for line in str(cause).splitlines() if line.strip()), "")
            warnings.warn(f"torch.compile of the decode step failed, decoding uncompiled: {type(cause).__name__}: "
                          f"{why}", stacklevel=2)
            return None
        finally:
            _ACTIVE.reset(token)


def _compile_errors() -> tuple[type[Exception], ...]:
    """What a compilation raises (with ``fullgraph``, before any op of the step ran): dynamo's and the backend's
    errors, and (torch >= 2.6) the hard stop one compilation past ``torch._dynamo.config.recompile_limit``."""
    from torch._dynamo import exc

    limit = getattr(exc, "FailOnRecompileLimitHit", None)
    return (exc.TorchDynamoException,) + ((limit,) if limit is not None else ())


__all__ = ["CompiledDecode", "DecodeGraph", "GraphedDecoding", "cached_linear_attention", "compile_enabled",
           "decoding_state", "graph_ready", "graphs_enabled", "note_failure", "reserve_step"]
