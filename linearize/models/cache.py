"""Constant-size generation cache, built on transformers' cache classes.

Per layer, one of:
- ``RecurrentStateLayer`` for every linear / hybrid layer: the fp32 recurrent state S [B, Hs, F, D] and z [B, Hs, F]
  (transformers' ``LinearAttentionLayer`` slots 0 and 1, static addresses, updated in place by the decode kernel)
  and, when ``window > 0``, ring buffers of ``W`` slots for the window's raw keys, values and phi(k):
  ``k_ring [B, Hk, W, d]``, ``v_ring [B, Hk, W, D]``, ``fk_ring [B, Hs, W, F]``, key ``j`` in slot ``j % W``.
  After ``n`` tokens the state covers keys ``j <= n - W`` and the ring holds keys ``n - W + 1 .. n - 1`` (the layout
  ``kernels.hybrid_decode_step`` reads and advances in one launch); ``pos [B]`` (int32, on the device) is ``n``.
- ``SoftmaxKVLayer`` for layers that kept softmax attention: keys and values in a preallocated buffer
  ``k_buf [B, Hk, C, d]``, ``v_buf [B, Hk, C, D]`` (key ``j`` in slot ``j``) with ``pos [B]`` (int32, on the device)
  filled slots. The prompt (and any call with padding) goes through ``update`` as through a ``DynamicLayer``; a plain
  decode step writes the new key at slot ``pos`` and reads only the filled slots (``kernels.softmax_decode_step``),
  at static addresses, so CUDA graphs hold it. The buffer grows by reallocation (at least doubling), which moves it.
  A kept layer that the teacher runs with a sliding window gets transformers' ``DynamicSlidingWindowLayer`` instead
  (``models/sliding.py``).

phi(k) is cached so that the key leaving the window can be folded into the state without re-running the feature
map; it costs ``Hs * W * F`` more elements per layer than a plain key/value window.

A **window-only** layer (``window_only_layers`` without a global cache: its linear part switched off, so that it
reads its exact part alone) is a ``RecurrentStateLayer`` with ``linear=False``: the ``k_ring`` / ``v_ring`` and the sinks
only, no state and no phi(k) ring (``kernels.window_decode_step`` decodes it).

With attention sinks (``sinks = E > 0``) a recurrent layer also keeps the first ``E`` real tokens of every sequence:
``sink_k [B, Hk, E, d]``, ``sink_v [B, Hk, E, D]``, their positions ``sink_pos [B, E]`` (int32, in the coordinates
of ``pos``; ``NO_SINK`` while a slot is empty) and ``sink_count [B]``; their phi(k) is stored as zero in the ring, so
leaving the window folds nothing into the state.

A delta-rule layer (``state_update`` delta / gated-delta, ``kernels/delta``) keeps one ``[B, Hs, F, D + 1]`` state in
slot 0 (the normaliser is its last column; slot 1 is empty) and ``state_upto [B]`` (int64): the last key folded in.
Its decode step folds the key that left the window before reading, so it needs to know whether that key is in.

With a global cache (``global_cache = K > 0``, ``kernels/hybrid/global_cache.py``) a recurrent layer also keeps
``K`` exact pairs per kv head from beyond the window: ``g_k [B, Hk, K, d]``, ``g_v [B, Hk, K, D]``,
``g_fk [B, Hs, K, F]`` (the model dtype), ``g_pos [B, Hk, K]`` (int64, coordinates of ``pos``; ``NO_SINK`` while
empty) and ``g_score [B, Hk, K]`` (fp32 recall errors, ``-inf`` while empty). The state still folds every key that
leaves the window; the members' linear terms are subtracted when read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, LinearAttentionLayer

from linearize.errors import LinearizeError
from linearize.kernels import NO_SINK, Sinks
from linearize.kernels.hybrid.global_cache import GlobalSet
from linearize.kernels.hybrid.sinks import new_sink_slots
from linearize.kernels.softmax_decode import softmax_decode_step
from linearize.modules.config import LinearAttentionConfig

_S, _Z = 0, 1  # recurrent state slots


class RecurrentStateLayer(LinearAttentionLayer, CacheLayerMixin):
    """Recurrent state + window ring buffers of one linear / hybrid layer (see the module docstring)."""

    is_sliding = False
    # generate() would torch.compile the decode step of a "compileable" cache; the decode kernel mutates the cache
    # tensors in place (cudagraphs are skipped anyway) and compilation costs more than it saves here.
    is_compileable = False

    def __init__(self, window: int = 0, sinks: int = 0, global_cache: int = 0, linear: bool = True):
        LinearAttentionLayer.__init__(self, number_of_states=2)
        if not linear and (window <= 0 or global_cache):
            raise LinearizeError(f"a window-only cache layer needs a window and no global cache (window={window}, "
                                 f"global_cache={global_cache}): its state would be all it reads, or choose members")
        self.linear = bool(linear)
        """False: a window-only layer's cache (no state, no phi(k) ring; module docstring)."""
        self.window = int(window)
        self.sinks = int(sinks)
        self.global_cache = int(global_cache)
        self.g_k: Tensor | None = None
        self.g_v: Tensor | None = None
        self.g_fk: Tensor | None = None
        self.g_pos: Tensor | None = None
        self.g_score: Tensor | None = None
        self.state_upto: Tensor | None = None
        self.sink_k: Tensor | None = None
        self.sink_v: Tensor | None = None
        self.sink_pos: Tensor | None = None
        self.sink_count: Tensor | None = None
        self.sinks_filled = 0
        """Fewest sinks any row holds (host copy): once it reaches ``sinks``, no new token can be one."""
        self.keys = self.values = None  # CacheLayerMixin fields; this layer keeps no growing KV
        self.is_initialized = False
        self.cumulative_length = 0
        self.k_ring: Tensor | None = None
        self.v_ring: Tensor | None = None
        self.fk_ring: Tensor | None = None
        self.pos: Tensor | None = None

    # -- state -------------------------------------------------------------------------------------------------
    def has_state(self) -> bool:
        """Whether a pass has stored anything (a window-only layer: its ring and position; else its state)."""
        if not self.linear:
            return self.pos is not None
        return bool(self.is_recurrent_states_initialized[_S])

    def state(self) -> tuple[Tensor, Tensor] | None:
        """``(S, z)``, or None for a window-only layer."""
        if not self.linear:
            return None
        return self.recurrent_states[_S], self.recurrent_states[_Z]

    def window_keys(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The cached window keys, values and phi(k) (None for a window-only layer) in order (the last
        ``min(W - 1, n)`` tokens), or None."""
        n = self.cumulative_length
        m = min(self.window - 1, n) if self.window > 0 else 0
        if m <= 0 or self.k_ring is None:
            return None
        slots = torch.arange(n - m, n, device=self.k_ring.device) % self.window
        fk = None if self.fk_ring is None else self.fk_ring[:, :, slots]
        return self.k_ring[:, :, slots], self.v_ring[:, :, slots], fk

    def store(self, k: Tensor, v: Tensor, fk: Tensor | None, state: tuple[Tensor, Tensor] | None, new_tokens: int,
              key_mask: Tensor | None = None) -> None:
        """After a pass over ``new_tokens`` tokens: keep ``state`` and the window part of ``k/v/fk`` (which may start
        with the previous window keys, as returned by :meth:`window_keys`). ``key_mask [B, Tk]`` (False = padding)
        zeroes padded keys' phi(k) so that folding them later adds nothing. A window-only layer takes
        ``fk = state = None`` and keeps the keys and values alone."""
        if self.linear:
            if fk is None or state is None:
                raise LinearizeError("a linear layer's cache stores its state and phi(k)")
            self.update_recurrent_state(state[0].float(), _S)
            self.update_recurrent_state(state[1].float(), _Z)
        n = self.cumulative_length + new_tokens
        B = v.shape[0]
        if self.window > 0:
            W = self.window
            if self.k_ring is None:
                self.k_ring = k.new_zeros(B, k.shape[1], W, k.shape[-1])
                self.v_ring = v.new_zeros(B, v.shape[1], W, v.shape[-1])
                if self.linear:
                    self.fk_ring = fk.new_zeros(B, fk.shape[1], W, fk.shape[-1])
            m = min(W - 1, k.shape[2])
            if m > 0:
                slots = torch.arange(n - m, n, device=k.device) % W
                self.k_ring[:, :, slots] = k[:, :, -m:].to(self.k_ring.dtype)
                self.v_ring[:, :, slots] = v[:, :, -m:].to(self.v_ring.dtype)
                if self.linear:
                    fk_new = fk[:, :, -m:]
                    if key_mask is not None:
                        fk_new = fk_new * key_mask[:, None, -m:, None].to(fk_new.dtype)
                    self.fk_ring[:, :, slots] = fk_new.to(self.fk_ring.dtype)
        if self.pos is None or self.pos.shape[0] != B:
            self.pos = torch.full((B,), n, dtype=torch.int32, device=v.device)
        else:
            self.pos.fill_(n)
        self.cumulative_length = n

    # -- attention sinks ---------------------------------------------------------------------------------------
    def take_sinks(self, k: Tensor, v: Tensor, fk: Tensor | None, key_mask: Tensor | None) -> Tensor | None:
        """Record which of ``T`` new tokens (``k [B, Hk, T, d]``, ``v``, ``fk [B, Hs, T, F]``, ``key_mask [B, T]``
        or None) are sinks, the first ``sinks`` real tokens of their row, and return ``fk`` with those rows zeroed
        (None stays None: a window-only layer). No work (and no host sync) once every row has all its sinks, as in
        steady-state decoding."""
        if self.sinks == 0 or self.sinks_filled >= self.sinks:
            return fk
        B, T = k.shape[0], k.shape[2]
        if self.sink_k is None or self.sink_k.shape[0] != B:
            E = self.sinks
            self.sink_k = k.new_zeros(B, k.shape[1], E, k.shape[-1])
            self.sink_v = v.new_zeros(B, v.shape[1], E, v.shape[-1])
            self.sink_pos = torch.full((B, E), NO_SINK, dtype=torch.int32, device=k.device)
            self.sink_count = torch.zeros(B, dtype=torch.int32, device=k.device)
        slot = new_sink_slots(key_mask, self.sinks, self.sink_count, B, T, k.device)
        b, t = (slot >= 0).nonzero(as_tuple=True)
        if b.numel():
            e = slot[b, t]
            self.sink_k[b, :, e] = k[b, :, t].to(self.sink_k.dtype)
            self.sink_v[b, :, e] = v[b, :, t].to(self.sink_v.dtype)
            self.sink_pos[b, e] = (self.cumulative_length + t).to(torch.int32)
            self.sink_count += (slot >= 0).sum(1).to(torch.int32)
        self.sinks_filled = int(self.sink_count.min())
        return None if fk is None else fk * (slot < 0)[:, None, :, None].to(fk.dtype)

    def sink_keys(self, offset: int = 0) -> Sinks | None:
        """``(sink_k, sink_v, sink_pos - offset)`` for a kernel call whose key index is position ``- offset``."""
        if self.sinks == 0 or self.sink_k is None:
            return None
        pos = self.sink_pos if offset == 0 else torch.where(self.sink_pos < NO_SINK, self.sink_pos - offset,
                                                            self.sink_pos)
        return self.sink_k, self.sink_v, pos

    def set_state_upto(self, key: int) -> None:
        """Every key up to position ``key`` is in the state (a delta-rule layer after a pass); static address."""
        B = self.pos.shape[0]
        if self.state_upto is None or self.state_upto.shape[0] != B:
            self.state_upto = torch.full((B,), key, dtype=torch.long, device=self.pos.device)
        else:
            self.state_upto.fill_(key)

    # -- global cache -----------------------------------------------------------------------------------------
    def global_set(self, offset: int = 0) -> GlobalSet | None:
        """The global set with positions ``- offset`` (a call's key index), or None before the first pass."""
        if self.global_cache == 0 or self.g_score is None:
            return None
        pos = self.g_pos if offset == 0 else torch.where(torch.isfinite(self.g_score), self.g_pos - offset, self.g_pos)
        return self.g_k, self.g_v, self.g_fk, pos, self.g_score

    def store_global(self, gset: GlobalSet, offset: int) -> None:
        """Keep a pass's final global set (positions in its key index, ``offset`` = that index's position 0); the
        buffers keep their addresses once allocated (the decode step and its CUDA graph update them in place)."""
        k, v, fk, pos, score = gset
        pos = torch.where(torch.isfinite(score), pos + offset, pos)
        new = (k, v, fk, pos, score)
        names = ("g_k", "g_v", "g_fk", "g_pos", "g_score")
        if self.g_score is None or self.g_score.shape != score.shape:
            for name, t in zip(names, new):
                setattr(self, name, t.contiguous())
            return
        for name, t in zip(names, new):
            getattr(self, name).copy_(t)

    def decode_buffers(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
        """(k_ring, v_ring, fk_ring, pos) for ``kernels.hybrid_decode_step``, which updates them in place."""
        return self.k_ring, self.v_ring, self.fk_ring, self.pos

    def advance(self, tokens: int = 1) -> None:
        """Count tokens a decode step added (the kernel already wrote the ring and the state)."""
        self.cumulative_length += tokens
        self.pos += tokens

    # -- transformers' cache-layer interface ----------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        raise LinearizeError("a linearized layer's cache is written by its attention module, not Cache.update")

    def lazy_initialization(self, *args, **kwargs) -> None:
        LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        for t in (self.k_ring, self.v_ring, self.fk_ring, self.pos, self.sink_k, self.sink_v, self.sink_count,
                  self.g_k, self.g_v, self.g_fk):
            if t is not None:
                t.zero_()
        if self.state_upto is not None:
            self.state_upto.fill_(-1)
        if self.sink_pos is not None:
            self.sink_pos.fill_(NO_SINK)
        if self.g_score is not None:
            self.g_pos.fill_(NO_SINK)
            self.g_score.fill_(float("-inf"))
        self.sinks_filled = 0
        self.cumulative_length = 0

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        for i, t in self.recurrent_states.items():
            if t is not None:
                self.recurrent_states[i] = fn(t).contiguous()
        for name in ("k_ring", "v_ring", "fk_ring", "pos", "sink_k", "sink_v", "sink_pos", "sink_count", "g_k", "g_v",
                     "g_fk", "g_pos", "g_score", "state_upto"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t).contiguous())
        if self.sink_count is not None:
            self.sinks_filled = int(self.sink_count.min()) if self.sink_count.numel() else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise LinearizeError("a recurrent state cannot be rolled back: linearized layers do not support cache crop "
                             "(e.g. assisted decoding)")

    def nbytes(self) -> int:
        total = 0
        for t in list(self.recurrent_states.values()) + [self.k_ring, self.v_ring, self.fk_ring, self.sink_k,
                                                          self.sink_v, self.g_k, self.g_v, self.g_fk, self.g_pos,
                                                          self.g_score]:
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
        return total


KV_SLACK = 256
"""Free slots a :class:`SoftmaxKVLayer` allocates past its first fill (the prompt): that many decode steps before the
first reallocation."""
KV_ALIGN = 128
"""Capacities are multiples of this many slots."""


def _filled_view(buffer: str, name: str) -> property:
    """A read-only property: the filled prefix of the buffer attribute ``buffer`` (None before the first fill)."""

    def get(self) -> Tensor | None:
        buf = getattr(self, buffer)
        return None if buf is None else buf[:, :, : self.cumulative_length]

    def put(self, value) -> None:
        if value is not None:
            raise LinearizeError(f"SoftmaxKVLayer.{name} is a view of its buffer; write through update()")

    return property(get, put)


class SoftmaxKVLayer(CacheLayerMixin):
    """The KV cache of a layer that kept softmax attention, at static addresses (see the module docstring).

    ``k_buf [B, Hk, C, d]`` and ``v_buf [B, Hk, C, D]`` hold key ``j`` in slot ``j``; ``cumulative_length`` (host) and
    ``pos [B]`` (int32, on the device) count the filled slots. Two ways in:

    - :meth:`update`, transformers' cache-layer call that the kept attention module (the teacher's own) makes for
      a prompt, a padded batch, or anything but a plain decode step: the new keys go to the next slots and the
      filled prefix comes back as views (``keys``, ``values``; what a ``DynamicLayer`` would return), for the
      module's own attention and mask;
    - :meth:`decode`, the plain one-token step (``models/softmax.py``): ``kernels.softmax_decode_step`` writes the
      new key and value at slot ``pos[b]`` and reads only the filled slots, with ``pos`` on the device, so the step
      has the same shapes and addresses every time and a CUDA graph can hold it.

    The buffers grow only by reallocation (:meth:`reserve`: at least double, and ``KV_SLACK`` free slots past the
    first fill), which moves them: ``models/graphs.py`` then captures the step again. A reallocation must happen
    before a step a graph replays: :func:`graphs.GraphedDecoding.run` reserves the step's slot first.
    """

    is_sliding = False
    is_compileable = False  # (see RecurrentStateLayer) the decode step writes the buffers in place
    is_croppable = True

    def __init__(self) -> None:
        self.is_initialized = False
        self.k_buf: Tensor | None = None
        self.v_buf: Tensor | None = None
        self.pos: Tensor | None = None
        self.cumulative_length = 0
        self.reallocations = 0
        """Times the buffers moved (a test and diagnosis counter)."""

    # transformers reads ``keys`` / ``values`` (e.g. ``Cache`` helpers): the filled prefix, as a DynamicLayer holds
    keys = _filled_view("k_buf", "keys")
    values = _filled_view("v_buf", "values")

    @property
    def capacity(self) -> int:
        return 0 if self.k_buf is None else self.k_buf.shape[2]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, Hk, _, d = key_states.shape
        self.device = key_states.device
        self.k_buf = key_states.new_zeros(B, Hk, 0, d)
        self.v_buf = value_states.new_zeros(B, Hk, 0, value_states.shape[-1])
        self.pos = torch.zeros(B, dtype=torch.int32, device=key_states.device)
        self.is_initialized = True

    def reserve(self, length: int) -> bool:
        """Make room for ``length`` keys; True when the buffers moved (reallocated, the filled prefix copied)."""
        if self.k_buf is None or length <= self.capacity:
            return False
        grown = max(length + (KV_SLACK if self.capacity == 0 else 0), 2 * self.capacity)
        C = -(-grown // KV_ALIGN) * KV_ALIGN
        n = self.cumulative_length
        B, Hk, _, d = self.k_buf.shape
        k = self.k_buf.new_zeros(B, Hk, C, d)
        v = self.v_buf.new_zeros(B, Hk, C, self.v_buf.shape[-1])
        k[:, :, :n] = self.k_buf[:, :, :n]
        v[:, :, :n] = self.v_buf[:, :, :n]
        self.k_buf, self.v_buf = k, v
        self.reallocations += 1
        return True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``T`` keys and values ``[B, Hk, T, d|D]``; return the filled prefix ``[B, Hk, n + T, d|D]``."""
        if key_states.is_cuda and torch.cuda.is_current_stream_capturing():
            # this path's shapes follow the host count: a graph of it would replay a stale length (DecodeGraph then
            # decodes eagerly, with a warning)
            raise RuntimeError("SoftmaxKVLayer.update cannot run inside a CUDA-graph capture: only the static decode "
                               "step (models/softmax.py) can")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, T = self.cumulative_length, key_states.shape[-2]
        self.reserve(n + T)
        self.k_buf[:, :, n : n + T] = key_states.to(self.k_buf.dtype)
        self.v_buf[:, :, n : n + T] = value_states.to(self.v_buf.dtype)
        self.cumulative_length = n + T
        self.pos.fill_(n + T)
        return self.keys, self.values

    def decode(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str = "auto") -> Tensor:
        """One plain decode step: q [B, H, 1, d], k/v [B, Hk, 1, d|D] -> o [B, H, 1, D] (softmax over every cached key
        and the new one, which is stored at slot ``pos``); advances ``pos`` and the host count."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self.reserve(self.cumulative_length + 1)  # a no-op in a graphed step (reserved before the replay)
        o = softmax_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache=self.k_buf, v_cache=self.v_buf,
                                pos=self.pos, scale=scale, backend=backend)
        self.pos += 1
        self.cumulative_length += 1
        return o.unsqueeze(2)

    def decode_buffers(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(k_buf, v_buf, pos): what the decode step reads and writes in place."""
        return self.k_buf, self.v_buf, self.pos

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cumulative_length = 0
        if self.pos is not None:
            self.pos.zero_()

    def offload(self) -> None:
        pass  # buffers stay on their device (static addresses)

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` keys (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.cumulative_length = max(self.cumulative_length + tokens_to_remove, 0)
        if self.pos is not None:
            self.pos.fill_(self.cumulative_length)

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name in ("k_buf", "v_buf", "pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t).contiguous())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def nbytes(self) -> int:
        """Bytes of the filled keys and values (what a ``DynamicLayer`` would hold; the free slots are not
        counted, see ``capacity``)."""
        if self.k_buf is None:
            return 0
        n = self.cumulative_length
        return n * (self.k_buf[:, :, :1].numel() * self.k_buf.element_size()
                    + self.v_buf[:, :, :1].numel() * self.v_buf.element_size())


class LinearizedCache(DynamicCache):
    """A ``DynamicCache`` whose layers follow the linearized model's layout."""

    def __init__(self, window: int, num_layers: int, softmax_layers: list[int] | tuple[int, ...] = (), sinks: int = 0,
                 global_cache: int = 0, window_only_layers: list[int] | tuple[int, ...] = ()):
        """``window_only_layers``: the layers whose cache keeps no state (their linear part is off; ignored with a
        global cache, whose state still chooses the members)."""
        no_state = set() if global_cache else set(window_only_layers)
        layers = [SoftmaxKVLayer() if i in softmax_layers
                  else RecurrentStateLayer(window, sinks, global_cache, linear=i not in no_state)
                  for i in range(num_layers)]
        Cache.__init__(self, layers=layers)

    def nbytes(self) -> int:
        """Bytes held by every cached tensor (recurrent states, window rings, softmax KV)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, (RecurrentStateLayer, SoftmaxKVLayer)):
                total += layer.nbytes()
            elif layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total


def cache_nbytes(cache) -> int:
    """Bytes held by any transformers cache: a :class:`LinearizedCache`'s own count, else every layer's keys and
    values (a softmax model's KV cache)."""
    if cache is None:
        return 0
    if isinstance(cache, LinearizedCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_bytes_per_sequence(
    *, linear_layers: int, num_state_heads: int, num_kv_heads: int, feature_dim: int, head_dim: int, window: int,
    dtype_bytes: int = 2, sinks: int = 0, global_cache: int = 0, window_only_layers: int = 0,
) -> tuple[int, int]:
    """(recurrent state bytes, window bytes) one sequence holds, over the linear layers: fp32 S [F, D] and z [F] per
    state head, plus ring buffers of ``W`` keys and values per kv head and ``W`` phi(k) per state head in the model
    dtype, plus ``sinks`` keys and values per kv head (counted with the window: both are exact-softmax keys), plus
    ``global_cache`` keys, values and phi(k) per kv head with their int64 position and fp32 score (counted with
    the window too). ``window_only_layers`` of the ``linear_layers`` keep no state and no phi(k) (without a global
    cache; with one they keep everything)."""
    stateful = linear_layers - (0 if global_cache else window_only_layers)
    state = stateful * num_state_heads * (feature_dim * head_dim + feature_dim) * 4
    win = linear_layers * window * 2 * num_kv_heads * head_dim * dtype_bytes
    win += stateful * window * num_state_heads * feature_dim * dtype_bytes
    win += linear_layers * sinks * 2 * num_kv_heads * head_dim * dtype_bytes
    win += linear_layers * global_cache * (num_kv_heads * (2 * head_dim * dtype_bytes + 8 + 4)
                                           + num_state_heads * feature_dim * dtype_bytes)
    return state, win


@dataclass(frozen=True)
class CacheGeometry:
    """What one sequence's generation cache costs per layer, for a model and its attention settings."""

    n_layers: int
    num_kv_heads: int
    head_dim: int
    num_state_heads: int
    feature_dim: int
    window: int
    sinks: int
    dtype_bytes: int
    global_cache: int = 0
    window_only: int = 0
    """Window-only layers (no state, no phi(k) ring): counted among the linear layers; 0 with a global cache."""

    @classmethod
    def from_config(cls, c: dict[str, Any], lin: LinearAttentionConfig, dtype_bytes: int) -> CacheGeometry:
        """From a (teacher's or export's) ``config.json`` dict and the attention settings."""
        from linearize.modules.feature_maps import make_feature_map

        n_heads = c.get("num_attention_heads", c.get("n_head"))
        n_kv = c.get("num_key_value_heads") or n_heads
        head_dim = c.get("head_dim") or c.get("hidden_size", c.get("n_embd")) // n_heads
        return cls(
            n_layers=c.get("num_hidden_layers", c.get("n_layer")), num_kv_heads=n_kv, head_dim=head_dim,
            num_state_heads=n_kv if lin.state_per == "kv" else n_heads,
            feature_dim=make_feature_map(lin.feature_map, 1, head_dim, lin.proj_dim).feature_dim,
            window=lin.window, sinks=lin.sinks, dtype_bytes=dtype_bytes, global_cache=lin.global_cache,
            window_only=0 if lin.global_cache else len(lin.window_only_layers),
        )

    def linear_parts(self, linear_layers: int, window_only: int | None = None) -> tuple[int, int]:
        """(fp32 state bytes, window + sink bytes) of ``linear_layers`` linear layers, ``window_only`` of them
        (default: the geometry's) window-only: constant in the context."""
        return cache_bytes_per_sequence(
            linear_layers=linear_layers, num_state_heads=self.num_state_heads, num_kv_heads=self.num_kv_heads,
            feature_dim=self.feature_dim, head_dim=self.head_dim, window=self.window, dtype_bytes=self.dtype_bytes,
            sinks=self.sinks, global_cache=self.global_cache,
            window_only_layers=self.window_only if window_only is None else window_only,
        )

    def linear_layer_bytes(self) -> int:
        """One linear layer that keeps its linear part (the layers the softmax selection chooses from)."""
        return sum(self.linear_parts(1, window_only=0))

    def softmax_layer_bytes(self, context: int) -> int:
        """One softmax layer's KV cache at ``context`` tokens."""
        return 2 * self.num_kv_heads * self.head_dim * context * self.dtype_bytes

    def bytes_per_sequence(self, n_softmax: int, context: int) -> int:
        """The whole cache of one sequence at ``context`` tokens with ``n_softmax`` softmax layers."""
        return sum(self.linear_parts(self.n_layers - n_softmax)) + n_softmax * self.softmax_layer_bytes(context)

    def teacher_bytes(self, context: int) -> int:
        """The teacher's KV cache at ``context`` tokens (every layer softmax)."""
        return self.n_layers * self.softmax_layer_bytes(context)


__all__ = ["KV_ALIGN", "KV_SLACK", "CacheGeometry", "LinearizedCache", "RecurrentStateLayer", "SoftmaxKVLayer", "cache_bytes_per_sequence", "cache_nbytes"]
