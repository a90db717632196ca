"""The linear / hybrid attention module shared by every architecture adapter.

An adapter computes q, k, v exactly as its base model does (projections, RoPE), then calls
:meth:`HybridLinearAttention.forward`, which applies the feature maps, reads/writes the recurrent cache and runs
the kernel. The module holds only the new, trainable parts: ``feature_map_q``, ``feature_map_k`` and ``mix_logit``
(gamma = sigmoid(mix_logit), one per query head, used when ``window > 0``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from linearize.errors import ConfigError, LinearizeError
from linearize.kernels import BACKENDS, Sinks, hybrid_attention, hybrid_decode_step, window_decode_step
from linearize.kernels.delta import delta_attention, delta_decode_step
from linearize.kernels.hybrid.exact import exact_window_decode, exact_window_parts
from linearize.kernels.hybrid.global_cache import (
    GlobalSet,
    eligible_keys,
    empty_global_set,
    global_decode_step,
    hybrid_attention_global,
)
from linearize.kernels.hybrid.sinks import sequence_sinks
from linearize.modules.config import LinearAttentionConfig
from linearize.modules.feature_maps import make_feature_map


@runtime_checkable
class RecurrentCacheLayer(Protocol):
    """What :class:`HybridLinearAttention` needs from one layer's generation cache; implemented in
    ``models/cache.py`` (``RecurrentStateLayer``) on transformers' cache classes.

    After ``n`` tokens the layer holds the fp32 state ``(S [B, Hs, F, D], z [B, Hs, F])`` of keys ``<= n - W`` and
    ring buffers of the window's last ``W - 1`` raw keys, values and phi(k) (key ``j`` in slot ``j % W``); with
    ``linear`` False (a window-only layer's cache) the keys and values alone."""

    linear: bool
    """False: no state and no phi(k) are kept (:meth:`HybridLinearAttention._exact_only_cached` reads it)."""

    def has_state(self) -> bool:
        """Whether any token was stored yet."""
        ...

    def state(self) -> tuple[Tensor, Tensor] | None:
        """``(S, z)``, updated in place by the decode kernel; None when ``linear`` is False."""
        ...

    def window_keys(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The window's cached keys, values and phi(k) in order, or None."""
        ...

    def store(self, k: Tensor, v: Tensor, fk: Tensor, state: tuple[Tensor, Tensor], new_tokens: int,
              key_mask: Tensor | None = None) -> None:
        """Keep ``state`` and the window part of ``k, v, fk`` after a pass over ``new_tokens`` tokens."""
        ...

    def decode_buffers(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
        """``(k_ring, v_ring, fk_ring, pos [B] int32)`` for the one-launch decode step, which writes them in place."""
        ...

    def take_sinks(self, k: Tensor, v: Tensor, fk: Tensor, key_mask: Tensor | None) -> Tensor:
        """Keep the new tokens that are attention sinks (the first ``sinks`` real tokens of each row); returns
        ``fk`` with their rows zeroed so that they never enter the state."""
        ...

    def sink_keys(self, offset: int = 0) -> Sinks | None:
        """The stored sinks ``(k, v, position - offset)``, or None without sinks."""
        ...

    def advance(self, tokens: int = 1) -> None:
        """Count tokens a decode step added."""
        ...

    def global_set(self, offset: int = 0) -> GlobalSet | None:
        """The global cache's pairs with positions ``- offset``, or None (no global cache, or no pass yet)."""
        ...

    def store_global(self, gset: GlobalSet, offset: int) -> None:
        """Keep a pass's final global set (positions in its key index; ``offset`` is that index's position 0)."""
        ...

    def set_state_upto(self, key: int) -> None:
        """Every key up to position ``key`` is in the state (a delta-rule layer after a pass); the per-row tensor
        ``state_upto`` [B] (int64) then says so, and a decode step advances it in place."""
        ...

    def get_seq_length(self) -> int:
        """Tokens seen so far (sinks and window included)."""
        ...


DELTA_BETA_INIT = 0.0
"""Initial write-strength logit of the delta forms: beta = sigmoid(0) = 0.5 for every key."""
DELTA_DECAY_INIT = -8.0
"""Initial decay logit of gated-delta: a = exp(-softplus(-8)) = 1 - 1/2981, a memory of about 3,000 keys (the scale of
the 4k-token recall probes' distances, so that transfer starts from a state that can still reach that far)."""


class HybridLinearAttention(nn.Module):
    """phi maps + mix factor + kernel call + cache handling, for one layer.

    Args:
        cfg: the linearization settings (this layer's own: immutable, replaced by :meth:`set_backend`).
        num_heads / num_kv_heads / head_dim: the base attention's geometry.
        scale: the base model's softmax scale (used by the window part).
    """

    def __init__(self, cfg: LinearAttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.settings = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = float(scale)
        self.window = cfg.window
        self.sinks = cfg.sinks
        self.global_cache = cfg.global_cache
        self.state_update = cfg.state_update
        self.feature_input = cfg.feature_input
        self.num_state_heads = num_kv_heads if cfg.state_per == "kv" else num_heads
        self.feature_map_q = make_feature_map(cfg.feature_map, num_heads, head_dim, cfg.proj_dim)
        self.feature_map_k = make_feature_map(cfg.feature_map, self.num_state_heads, head_dim, cfg.proj_dim)
        logit = math.log(cfg.mix_init / (1 - cfg.mix_init))
        self.mix_logit = nn.Parameter(torch.full((num_heads,), logit)) if cfg.window > 0 else None
        if cfg.state_update != "additive":
            # per state head, from the key's value (no RoPE in it: the gates do not depend on the position):
            # beta = sigmoid(w_b . v + b_b), log a = -softplus(w_a . v + b_a); zero weights, so that conversion starts
            # from one beta and one decay per layer
            self.gate_weight = nn.Parameter(torch.zeros(2, self.num_state_heads, head_dim))
            bias = torch.tensor([DELTA_BETA_INIT, DELTA_DECAY_INIT])[:, None].expand(2, self.num_state_heads)
            self.gate_bias = nn.Parameter(bias.clone())
        self.set_backend(cfg.backend)
        self.exact_softmax = False
        """When True, ``forward`` computes the exact causal softmax attention on the same q, k, v (the teacher for
        logit distillation, without a second copy of the weights); no cache, no padding."""
        self.linear_off = False
        """When True, the recurrent part is switched off: phi(k) is zero, so the state's terms leave numerator and
        normaliser alike and only the exact part (sinks + window) is read, in every path (training, prefill, decode,
        kernels). Set from ``window_only_layers`` when the model is built, and for every layer by
        :func:`linear_part_off` (eval's linear-off and StreamingLLM rows). With a global cache the state is still
        kept (its recall errors choose the members) and its terms are dropped instead, so that the exact part
        (sinks, window, global cache) is read alone."""
        self.window_dropped = False
        """When True (a training step of :func:`window_dropout`), ``forward`` runs pure linear attention over every
        key (no window, no sinks, no global cache), so that the state alone must carry the answer; no cache."""

    def set_backend(self, backend: str) -> None:
        """Kernel backend of this layer only: its attention kernels and its feature maps with fused kernels."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} must be one of {BACKENDS}")
        self.settings = self.settings.replace(backend=backend)
        self.feature_map_q.backend = self.feature_map_k.backend = backend

    @property
    def feature_dim(self) -> int:
        return self.feature_map_q.feature_dim

    @property
    def exact_only(self) -> bool:
        """Whether this layer reads its exact part alone and needs no state in its generation cache: its linear part
        is off, it has a window, and no global cache (whose members the state chooses)."""
        return self.linear_off and self.window > 0 and not self.global_cache

    def gamma(self) -> Tensor | None:
        return None if self.mix_logit is None else torch.sigmoid(self.mix_logit.float())

    def features(self, q: Tensor, k: Tensor, phi_in: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """phi(q) [B, H, T, F] and phi(k) [B, Hs, Tk, F]; the maps read ``phi_in = (q, k)`` before RoPE when given
        (``feature_input: unrotated``), else the ``q, k`` the window reads."""
        if phi_in is not None:
            q, k = phi_in
        if self.num_state_heads != k.shape[1]:
            k = k.repeat_interleave(self.num_state_heads // k.shape[1], dim=1)
        fk = self.feature_map_k(k)
        if self.state_update != "additive":  # the delta rule reads and writes unit vectors
            fq, fk = nn.functional.normalize(self.feature_map_q(q), dim=-1), nn.functional.normalize(fk, dim=-1)
            return fq, torch.zeros_like(fk) if self.linear_off else fk
        # with a global cache the state still chooses the members (its recall errors); the kernel drops its terms
        off = self.linear_off and not self.global_cache
        return self.feature_map_q(q), torch.zeros_like(fk) if off else fk

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_mask: Tensor | None = None,
        cache_layer: RecurrentCacheLayer | None = None,
        phi_in: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """q [B, H, T, d], k/v [B, Hk, T, d|D] (post-RoPE) -> o [B, H, T, D].

        ``key_mask`` [B, past + T] (bool, False = padding) covers every token seen so far; ``cache_layer`` is this
        layer's entry of the generation cache (None when not caching); ``phi_in``: the same q, k before RoPE, which
        the feature maps read instead when ``feature_input`` is unrotated (the adapter passes them then).
        """
        if self.feature_input == "unrotated" and phi_in is None:
            raise LinearizeError("feature_input=unrotated: the feature maps read q and k before RoPE, which the "
                                 "adapter passes as phi_in")
        if self.feature_input == "rotated":
            phi_in = None
        if self.exact_softmax:
            if cache_layer is not None or (key_mask is not None and not bool(key_mask.all())):
                raise LinearizeError("the softmax teacher runs on packed sequences without a cache "
                                     "(use_cache=False, no padding)")
            return self.exact_softmax_attention(q, k, v)
        if self.window_dropped:
            if cache_layer is not None:
                raise LinearizeError("window dropout is a training switch: run it without a cache (use_cache=False)")
            fq, fk = self.features(q, k, phi_in)
            key_mask = None if key_mask is None else key_mask[:, -k.shape[2] :].bool()
            if self.state_update != "additive":
                beta, log_a = self.gates(v, eligible_keys(k.shape[0], k.shape[2], key_mask, None, k.device))
                L_n, L_d, _ = delta_attention(fq, fk, v, beta, log_a, window=0, backend=self._delta_backend())
                return (L_n / (L_d + self.settings.eps)[..., None]).to(v.dtype)
            o, _ = hybrid_attention(None, None, v, fq, fk, None, window=0, scale=self.scale, key_mask=key_mask,
                                    eps=self.settings.eps, backend=self.settings.backend)
            return o
        if cache_layer is not None:
            return self._forward_cached(q, k, v, key_mask, cache_layer, phi_in)
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2] :].bool()
        fq, fk = self.features(q, k, phi_in)
        sinks = None
        if self.sinks:
            fk, sinks = sequence_sinks(k, v, fk, self.sinks, key_mask)
        if self.state_update != "additive":
            o, _ = self._delta_parallel(q, k, v, fq, fk, key_mask, sinks, None, False)
            return o
        if self.global_cache:
            o, _, _ = hybrid_attention_global(
                q, k, v, fq, fk, self.gamma(), window=self.window, scale=self.scale, budget=self.global_cache,
                key_mask=key_mask, eps=self.settings.eps, sinks=sinks, linear=not self.linear_off,
            )
            return o
        o, _ = hybrid_attention(
            q, k, v, fq, fk, self.gamma(), window=self.window, scale=self.scale, key_mask=key_mask,
            eps=self.settings.eps, backend=self.settings.backend, sinks=sinks,
        )
        return o

    def _forward_cached(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
                        cache_layer: RecurrentCacheLayer, phi_in: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Prefill or decode against one layer of the generation cache (:class:`RecurrentCacheLayer`).

        One new token with no padding among the window's keys (``key_mask`` None; the model drops the mask when
        that holds) runs ``hybrid_decode_step``: one launch reads the ring buffers and the state, writes the new
        key into the ring and folds the key leaving the window into the state, in place. Anything else (prompts,
        padding in the window) runs the chunked kernel over the cached window keys followed by the new ones.
        """
        if not cache_layer.linear:
            return self._exact_only_cached(q, k, v, key_mask, cache_layer)
        fq, fk = self.features(q, k, phi_in)
        gamma = self.gamma()
        T = q.shape[2]
        if self.sinks:  # new tokens that are sinks are stored as such and kept out of the state
            fk = cache_layer.take_sinks(k, v, fk, None if key_mask is None else key_mask[:, -T:].bool())
        if self.state_update != "additive":
            return self._delta_cached(q, k, v, fq, fk, gamma, key_mask, cache_layer)
        if T == 1 and key_mask is None and cache_layer.has_state() and self.global_cache:
            k_ring, v_ring, fk_ring, pos = cache_layer.decode_buffers()
            o = global_decode_step(
                q, k, v, fq, fk, gamma, state=cache_layer.state(), k_cache=k_ring, v_cache=v_ring, fk_cache=fk_ring,
                pos=pos, window=self.window, scale=self.scale, global_set=cache_layer.global_set(),
                eps=self.settings.eps, sinks=cache_layer.sink_keys() if self.sinks else None,
                linear=not self.linear_off, backend=self.settings.backend,
            )
            cache_layer.advance(1)
            return o
        if T == 1 and key_mask is None and cache_layer.has_state():
            k_ring, v_ring, fk_ring, pos = cache_layer.decode_buffers()
            o = hybrid_decode_step(
                q, k, v, fq, fk, gamma, state=cache_layer.state(), k_cache=k_ring, v_cache=v_ring,
                fk_cache=fk_ring, pos=pos, window=self.window, scale=self.scale, eps=self.settings.eps,
                backend=self.settings.backend, sinks=cache_layer.sink_keys() if self.sinks else None,
            )
            cache_layer.advance(1)
            return o
        prev = cache_layer.window_keys()
        if prev is not None:
            k, v, fk = (torch.cat([p.to(x.dtype), x], dim=2) for p, x in zip(prev, (k, v, fk)))
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2] :].bool()
        initial_state = cache_layer.state() if cache_layer.has_state() else None
        # this call's key index = position - (tokens seen - cached window keys)
        offset = cache_layer.get_seq_length() - (k.shape[2] - T)
        sinks = cache_layer.sink_keys(offset) if self.sinks else None
        # no key has left the window yet, nor will in this call (a prompt no longer than the window): the global
        # set stays empty and the state zero, so the fused hybrid kernels give the same output (an empty set stored)
        short = cache_layer.get_seq_length() + T <= self.window
        if self.global_cache and not short:
            o, state, gset = hybrid_attention_global(
                q, k, v, fq, fk, gamma, window=self.window, scale=self.scale, budget=self.global_cache,
                key_mask=key_mask, initial_state=initial_state, initial_global=cache_layer.global_set(offset),
                output_final_state=True, eps=self.settings.eps, sinks=sinks, linear=not self.linear_off,
            )
            cache_layer.store(k, v, fk, state, T, key_mask)
            cache_layer.store_global(gset, offset)
            return o
        o, state = hybrid_attention(
            q, k, v, fq, fk, gamma, window=self.window, scale=self.scale, key_mask=key_mask,
            initial_state=initial_state, output_final_state=True, eps=self.settings.eps, backend=self.settings.backend,
            sinks=sinks,
        )
        cache_layer.store(k, v, fk, state, T, key_mask)
        if self.global_cache and cache_layer.global_set() is None:
            B, Hk, _, d = k.shape
            gk, gv, gfk, gpos, gscore = empty_global_set(B, Hk, fk.shape[1], self.global_cache, d, v.shape[-1],
                                                         fk.shape[-1], dtype=k.dtype, device=k.device)
            cache_layer.store_global((gk, gv.to(v.dtype), gfk.to(fk.dtype), gpos, gscore), offset)
        return o

    def _exact_only_cached(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
                           cache_layer: RecurrentCacheLayer) -> Tensor:
        """Prefill or decode of a window-only layer (:attr:`exact_only`) against a cache layer that keeps no state
        and no phi(k) (``linear=False``): a decode step reads the window ring and the sinks alone
        (``window_decode_step``); a prefill runs the same kernels as the parallel forward with phi(k) zero (so the
        same output, for every state form: with phi(k) zero none adds anything) and stores the window's keys and
        values."""
        if not self.exact_only:
            raise LinearizeError("this layer's cache keeps no state (it was built while the layer's linear part was "
                                 "off); make a new cache for a layer that reads its linear part")
        T = q.shape[2]
        gamma = self.gamma()
        if self.sinks:
            cache_layer.take_sinks(k, v, None, None if key_mask is None else key_mask[:, -T:].bool())
        if T == 1 and key_mask is None and cache_layer.has_state():
            k_ring, v_ring, _, pos = cache_layer.decode_buffers()
            o = window_decode_step(
                q, k, v, gamma, k_cache=k_ring, v_cache=v_ring, pos=pos, window=self.window, scale=self.scale,
                eps=self.settings.eps, sinks=cache_layer.sink_keys() if self.sinks else None,
                backend=self.settings.backend,
            )
            cache_layer.advance(1)
            return o
        prev = cache_layer.window_keys()
        if prev is not None:
            k, v = (torch.cat([p.to(x.dtype), x], dim=2) for p, x in zip(prev[:2], (k, v)))
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2] :].bool()
        offset = cache_layer.get_seq_length() - (k.shape[2] - T)
        sinks = cache_layer.sink_keys(offset) if self.sinks else None
        fq = q.new_zeros(*q.shape[:3], self.feature_dim)
        fk = k.new_zeros(k.shape[0], self.num_state_heads, k.shape[2], self.feature_dim)
        o, _ = hybrid_attention(q, k, v, fq, fk, gamma, window=self.window, scale=self.scale, key_mask=key_mask,
                                eps=self.settings.eps, backend=self.settings.backend, sinks=sinks)
        cache_layer.store(k, v, None, None, T, key_mask)
        return o

    # -- the delta-rule state (state_update: delta | gated-delta) ----------------------------------------------
    def gates(self, v: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor]:
        """``(beta, log_a) [B, Hs, Tk]`` fp32 of the keys whose values are ``v [B, Hk, Tk, D]``; zero (the identity
        update) where ``eligible [B, Tk]`` is False (sinks, padding). ``delta`` keeps ``log_a = 0`` (no decay)."""
        if self.num_state_heads != v.shape[1]:
            v = v.repeat_interleave(self.num_state_heads // v.shape[1], dim=1)
        logits = torch.einsum("bstd,gsd->gbst", v.float(), self.gate_weight.float()) + \
            self.gate_bias.float()[:, None, :, None]
        beta = torch.sigmoid(logits[0])
        log_a = -nn.functional.softplus(logits[1]) if self.state_update == "gated-delta" else torch.zeros_like(beta)
        ok = eligible[:, None, :].to(beta.dtype)
        return beta * ok, log_a * ok

    def _delta_backend(self) -> str:
        return "torch" if self.settings.backend == "torch" else "auto"

    def _delta_parallel(self, q, k, v, fq, fk, key_mask, sinks, initial_state, output_final_state):
        """Exact part (window + sinks) plus the delta-rule recurrent part over one call's keys -> (o, final state)."""
        B, Tk = k.shape[0], k.shape[2]
        beta, log_a = self.gates(v, eligible_keys(B, Tk, key_mask, sinks, k.device))
        L_n, L_d, state = delta_attention(fq, fk, v, beta, log_a, window=self.window, initial_state=initial_state,
                                          output_final_state=output_final_state, backend=self._delta_backend())
        if self.window > 0:
            num, den = exact_window_parts(q, k, v, self.gamma(), window=self.window, scale=self.scale,
                                          key_mask=key_mask, sinks=sinks)
            L_n, L_d = L_n + num, L_d + den
        return (L_n / (L_d + self.settings.eps)[..., None]).to(v.dtype), state

    def _delta_cached(self, q, k, v, fq, fk, gamma, key_mask, cache_layer):
        """Prefill (any T, padding) or decode (one token, no padding in the window) of a delta-rule layer. The cache
        keeps the ``[B, Hs, F, D + 1]`` state of every key up to ``state_upto`` (per row); decoding folds the key that
        left the window (if not folded yet), then reads it with the window and the sinks."""
        T, W = q.shape[2], self.window
        if T == 1 and key_mask is None and cache_layer.has_state():
            S = cache_layer.state()[0]
            pos = cache_layer.decode_buffers()[3]
            i = pos.long()
            j = i - W  # the key leaving the window at this query (W = 0: the new key itself)
            upto = cache_layer.state_upto
            enter = (j >= 0) & (j > upto)
            sinks = cache_layer.sink_keys() if self.sinks else None
            if sinks is not None:
                enter = enter & ~(sinks[2].long() == j[:, None]).any(-1)
            if W > 0:
                k_ring, v_ring, fk_ring, _ = cache_layer.decode_buffers()
                bidx = torch.arange(q.shape[0], device=q.device)
                slot = i % W
                v_in, fk_in = v_ring[bidx, :, slot], fk_ring[bidx, :, slot]
            else:
                v_in, fk_in = v[:, :, 0], fk[:, :, 0]
            beta, log_a = self.gates(v_in[:, :, None], torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device))
            L_n, L_d = delta_decode_step(fq, S, fk_in, v_in, beta[..., 0], log_a[..., 0], enter)
            upto.copy_(torch.where(enter, j, upto))
            if W > 0:
                k_ring[bidx, :, slot] = k[:, :, 0].to(k_ring.dtype)
                v_ring[bidx, :, slot] = v[:, :, 0].to(v_ring.dtype)
                fk_ring[bidx, :, slot] = fk[:, :, 0].to(fk_ring.dtype)
                num, den, _ = exact_window_decode(q[:, :, 0], k_ring, v_ring, gamma, pos, window=W,
                                                  scale=self.scale, sinks=sinks)
                L_n, L_d = L_n + num[:, :, None], L_d + den[:, :, None]
            cache_layer.advance(1)
            return (L_n / (L_d + self.settings.eps)[..., None]).to(v.dtype)
        prev = cache_layer.window_keys()
        if prev is not None:
            k, v, fk = (torch.cat([p.to(x.dtype), x], dim=2) for p, x in zip(prev, (k, v, fk)))
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2] :].bool()
        offset = cache_layer.get_seq_length() - (k.shape[2] - T)
        sinks = cache_layer.sink_keys(offset) if self.sinks else None
        S0 = cache_layer.state()[0] if cache_layer.has_state() else None
        o, state = self._delta_parallel(q, k, v, fq, fk, key_mask, sinks, S0, True)
        cache_layer.store(k, v, fk, (state, state.new_zeros(*state.shape[:2], 0)), T, key_mask)
        cache_layer.set_state_upto(cache_layer.get_seq_length() - max(W, 1))  # the last key folded in
        return o

    def attention_weights(self, q: Tensor, k: Tensor, rows: slice | None = None,
                          phi_in: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Normalised attention weights of this (student) layer for query rows ``rows``: [B, H, R, T], fp32.

        Used by the Hedgehog cross-entropy loss. Memory is O(R * T); callers iterate over query blocks.
        """
        if self.state_update != "additive":
            raise ConfigError(f"the cross-entropy transfer loss needs state_update=additive (this layer's is "
                              f"{self.state_update}); use loss=mse")
        T = k.shape[2]
        rows = rows or slice(0, q.shape[2])
        phi_in = None if phi_in is None or self.feature_input == "rotated" else (phi_in[0][:, :, rows], phi_in[1])
        fq, fk = self.features(q[:, :, rows], k, phi_in)
        H = self.num_heads
        window, sinks = (0, 0) if self.window_dropped else (self.window, self.sinks)
        fk_h = fk.repeat_interleave(H // fk.shape[1], dim=1).float()
        i = torch.arange(T, device=q.device)[rows][:, None]
        j = torch.arange(T, device=q.device)[None, :]
        sink = j < sinks  # sinks: never linear; softmax keys once out of the window
        lin = torch.einsum("bhtf,bhsf->bhts", fq.float(), fk_h) * ((j <= i - window) & ~sink)
        w = lin
        if window > 0:
            k_h = k.repeat_interleave(H // k.shape[1], dim=1).float()
            s = torch.einsum("bhtd,bhsd->bhts", q[:, :, rows].float(), k_h) * self.scale
            win = (j <= i) & (j > i - window)
            c = s.masked_fill(~win, float("-inf")).amax(-1, keepdim=True)  # the window's max, as the kernels
            s = s.masked_fill(~(win | (sink & (j <= i))), float("-inf"))
            p = torch.exp(s - c) * self.gamma()[None, :, None, None]
            w = w + p
        return w / (w.sum(-1, keepdim=True) + self.settings.eps)

    def exact_softmax_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The teacher: exact causal softmax attention on the same q, k, v -> [B, H, T, D] in ``v``'s dtype.

        Half-precision inputs on CUDA run the way the base model's own attention runs them (SDPA on the inputs'
        dtype: a flash kernel with fp32 accumulation), so the teacher's numbers are those of its own forward and the
        cost is a fused kernel's, not an fp32 one's (an fp32 SDPA at 7-8B sizes takes as long as the rest of the
        transfer step); anything else runs in fp32 math."""
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        dtype = v.dtype
        if not (q.is_cuda and dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == dtype):
            q, k, v = q.float(), k.float(), v.float()
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return o.to(dtype)


@contextlib.contextmanager
def exact_softmax(layers: Iterable[HybridLinearAttention]) -> Iterator[None]:
    """Inside the block, each of ``layers`` computes the exact causal softmax attention on its q, k, v
    (:attr:`HybridLinearAttention.exact_softmax`: its teacher's attention, without a second copy of the weights)."""
    layers = list(layers)
    for la in layers:
        la.exact_softmax = True
    try:
        yield
    finally:
        for la in layers:
            la.exact_softmax = False


@contextlib.contextmanager
def linear_part_off(layers: Iterable[HybridLinearAttention]) -> Iterator[None]:
    """Inside the block, each of ``layers`` reads only its exact part (sinks + window): its recurrent part is
    switched off (:attr:`HybridLinearAttention.linear_off`). Caches built inside the block hold an empty state
    (a layer with a global cache keeps its state, unread, to choose the members)."""
    layers = list(layers)
    before = [la.linear_off for la in layers]
    for la in layers:
        la.linear_off = True
    try:
        yield
    finally:
        for la, was in zip(layers, before):
            la.linear_off = was


def window_dropped(p: float, step: int, seed: int) -> bool:
    """Whether training step ``step`` runs without windows (:func:`window_dropout`): a draw that depends only on
    ``(seed, step)``, so that a resumed run drops the same steps."""
    if p <= 0:
        return False
    return random.Random(seed * 1_000_003 + step).random() < p


@contextlib.contextmanager
def window_dropout(layers: Iterable[HybridLinearAttention], drop: bool) -> Iterator[None]:
    """Inside the block (when ``drop``), each of ``layers`` runs pure linear attention over every key: no window,
    no sinks, no global cache (:attr:`HybridLinearAttention.window_dropped`). Training with it on some steps makes
    the state carry what the window would otherwise answer (scheduled sliding-window dropout)."""
    layers = list(layers) if drop else []
    for la in layers:
        la.window_dropped = True
    try:
        yield
    finally:
        for la in layers:
            la.window_dropped = False


def linear_attention_layers(model: nn.Module) -> list[HybridLinearAttention]:
    """Every :class:`HybridLinearAttention` inside ``model`` (a linearized model, peft-wrapped or not), in order."""
    return [m for m in model.modules() if isinstance(m, HybridLinearAttention)]
