"""Attention sinks: which keys are sinks, and the sink terms of kernels that return their normaliser.

The definition lives with the other references in ``naive.py``: sinks are extra exact-softmax keys that a query
reads once they have left its window, as more terms of the window sums (relative to the window's max ``c_i``), and
that never enter the linear state. The sinks of a sequence are its first ``count`` real (unpadded) tokens
(StreamingLLM: models park attention mass on the first few tokens; a sliding window that drops them loses it).

* :func:`sequence_sinks` picks them from one whole sequence (training, prefill without a cache) and zeroes their
  phi(k), so that no form of the linear part can fold them.
* :func:`new_sink_slots` does the same for tokens appended to a cache that already holds some sinks per row.
* :func:`add_sinks` adds the sink terms to an output computed without them, given that pass's normaliser and
  window max: how the fused chunk kernel supports sinks without a second copy of its window loops. Exact (the
  rescaling by ``max(c, s_sink)`` only keeps the exponentials finite) and differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.hybrid.naive import NO_SINK, Sinks, _expand_heads


def new_sink_slots(key_mask: Tensor | None, count: int, taken: Tensor | None, B: int, T: int,
                   device: torch.device) -> Tensor:
    """Sink slot of each of ``T`` new keys per row, or -1: a real key is a sink while its row has fewer than
    ``count`` real tokens before it. ``key_mask [B, T]`` (False = padding; None = all real), ``taken [B]``: sinks
    each row already holds (None = 0). Returns ``[B, T]`` int64."""
    real = torch.ones(B, T, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
    rank = real.long().cumsum(1) - 1
    if taken is not None:
        rank = rank + taken.long()[:, None]
    return torch.where(real & (rank < count), rank, torch.full_like(rank, -1))


def sequence_sinks(k: Tensor, v: Tensor, fk: Tensor, count: int, key_mask: Tensor | None = None
                   ) -> tuple[Tensor, Sinks]:
    """The first ``count`` real keys of each sequence as sinks: ``(fk with those keys' rows zeroed, (k_s, v_s,
    pos))`` with ``pos`` their key index (``NO_SINK`` where a row has fewer real keys). ``k [B, Hk, Tk, d]``,
    ``v [B, Hk, Tk, D]``, ``fk [B, Hs, Tk, F]``, ``key_mask [B, Tk]``."""
    B, Hk, Tk, _ = k.shape
    if key_mask is None:  # the common case: the first keys of every row, no gather
        n = min(count, Tk)
        keep = (torch.arange(Tk, device=fk.device) >= n).to(fk.dtype)
        pos = torch.full((B, count), NO_SINK, dtype=torch.long, device=k.device)
        pos[:, :n] = torch.arange(n, device=k.device)
        k_s = k.new_zeros(B, Hk, count, k.shape[-1])
        v_s = v.new_zeros(B, Hk, count, v.shape[-1])
        k_s[:, :, :n], v_s[:, :, :n] = k[:, :, :n], v[:, :, :n]
        return fk * keep[:, None], (k_s, v_s, pos)
    slot = new_sink_slots(key_mask, count, None, B, Tk, k.device)
    fk = fk * (slot < 0)[:, None, :, None].to(fk.dtype)
    pos = torch.full((B, count), NO_SINK, dtype=torch.long, device=k.device)
    b, j = (slot >= 0).nonzero(as_tuple=True)
    pos[b, slot[b, j]] = j
    idx = pos.clamp_max(Tk - 1)
    k_s = torch.gather(k, 2, idx[:, None, :, None].expand(B, Hk, count, k.shape[-1]))
    v_s = torch.gather(v, 2, idx[:, None, :, None].expand(B, Hk, count, v.shape[-1]))
    return fk, (k_s, v_s, pos)


def add_sinks(o: Tensor, den: Tensor, c: Tensor, q: Tensor, sinks: Sinks, gamma: Tensor, *, scale: float,
              window: int, first_query: int) -> Tensor:
    """``o [B, H, T, D]`` computed without sinks, with its normaliser ``den [B, H, T]`` (eps included) and window
    max ``c [B, H, T]`` -> the output with the sink terms of ``naive.py``'s definition; query ``t`` has key index
    ``first_query + t``. fp32 arithmetic, result in ``o.dtype``."""
    k_s, v_s, pos = sinks
    H, T = q.shape[1], q.shape[2]
    s = torch.einsum("bhtd,bhed->bhte", q.float(), _expand_heads(k_s.float(), H)) * scale
    i = torch.arange(T, device=q.device) + first_query
    visible = pos.long()[:, None, None, :] <= (i - window)[None, None, :, None]
    s = s.masked_fill(~visible, float("-inf"))
    m = torch.maximum(c, s.amax(-1))  # both parts rescaled by exp(-m): finite, the same quotient
    alpha = torch.exp(c - m)
    p = torch.exp(s - m[..., None]) * gamma.float()[None, :, None, None]
    num = o.float() * (den * alpha)[..., None] + p @ _expand_heads(v_s.float(), H)
    return (num / (den * alpha + p.sum(-1))[..., None]).to(o.dtype)


__all__ = ["NO_SINK", "add_sinks", "new_sink_slots", "sequence_sinks"]
