"""A layer's exact part on its own: the window and the sinks as the unnormalised sums of ``naive.py``'s definition.

    num_i = g_h sum_{window(i), sinks seen by i} exp(s_ij - c_i) v_j,   den_i = g_h sum exp(s_ij - c_i)

with ``c_i`` the window's max, so that any recurrent part adds its ``(L_n, L_d)`` to them and the layer's output is
``(num + L_n) / (den + L_d + eps)``: one normaliser. The additive state's fused kernels compute both parts in one pass;
state forms that have their own kernels (the gated delta rule, ``kernels/delta``) combine through these functions.

* :func:`exact_window_parts`: a whole call (training, prefill), queries in chunks, O(T * (C + W)).
* :func:`exact_window_decode`: one new token over the ring buffer of ``decode_torch.py`` (the new key already in).

fp32 arithmetic and results; layouts as ``naive.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.hybrid.naive import Sinks, _expand_heads, _sink_terms


def exact_window_parts(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, window: int, scale: float,
                       key_mask: Tensor | None = None, sinks: Sinks | None = None,
                       chunk: int = 64) -> tuple[Tensor, Tensor]:
    """``(num [B, H, T, D], den [B, H, T])`` for ``q [B, H, T, d]`` over ``k / v [B, Hk, Tk, *]`` (the last ``T``
    keys are the queries'; the first ``Tk - T`` a prefix such as the cached window), ``window >= 1``."""
    if window < 1:
        raise ValueError(f"the exact part needs a window >= 1, got {window}")
    B, H, T, _ = q.shape
    Tk = k.shape[2]
    P = Tk - T
    dev = v.device
    q32, k32, v32 = q.float(), k.float(), v.float()
    g = gamma.float()[None, :, None, None]
    key_ok = key_mask.bool() if key_mask is not None else torch.ones(B, Tk, dtype=torch.bool, device=dev)
    num = torch.empty(B, H, T, v.shape[-1], dtype=torch.float32, device=dev)
    den = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        ks, ke = max(0, P + t0 - window + 1), P + t1
        s = torch.einsum("bhtd,bhsd->bhts", q32[:, :, t0:t1], _expand_heads(k32[:, :, ks:ke], H)) * scale
        i = torch.arange(t0, t1, device=dev)[:, None] + P
        j = torch.arange(ks, ke, device=dev)[None, :]
        m = ((j <= i) & (j > i - window))[None, None] & key_ok[:, None, None, ks:ke]
        s = s.masked_fill(~m, float("-inf"))
        c = s.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        p = torch.exp(s - c) * g
        n_c, d_c = p @ _expand_heads(v32[:, :, ks:ke], H), p.sum(-1)
        if sinks is not None:
            n_s, d_s = _sink_terms(q32[:, :, t0:t1], i[:, 0], c, sinks, g, scale, window)
            n_c, d_c = n_c + n_s, d_c + d_s
        num[:, :, t0:t1], den[:, :, t0:t1] = n_c, d_c
    return num, den


def exact_window_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, gamma: Tensor, pos: Tensor, *, window: int,
                        scale: float, sinks: Sinks | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(num [B, H, D], den [B, H], c [B, H, 1])`` of the new token ``q [B, H, d]`` at position ``pos [B]``, over the
    ring buffers ``k_cache / v_cache [B, Hk, W, *]`` that already hold it (key ``j`` in slot ``j % W``); ``c`` is the
    window's max, which more exact keys (a global cache's) are taken relative to."""
    H = q.shape[1]
    W = window
    i = pos.long()
    r = torch.arange(W, device=q.device)
    j = i[:, None] - ((i[:, None] - r[None, :]) % W)  # [B, W] key index held by each slot
    g = gamma.float()[None, :, None]
    q32 = q.float()
    s = torch.einsum("bhd,bhwd->bhw", q32, _expand_heads(k_cache.float(), H)) * scale
    s = s.masked_fill(~(j >= 0)[:, None], float("-inf"))
    c = s.amax(-1, keepdim=True)
    p = torch.exp(s - c) * g
    num = torch.einsum("bhw,bhwd->bhd", p, _expand_heads(v_cache.float(), H))
    den = p.sum(-1)
    if sinks is not None:
        k_s, v_s, spos = sinks
        s_s = torch.einsum("bhd,bhed->bhe", q32, _expand_heads(k_s.float(), H)) * scale
        seen = (spos.long() <= (i - W)[:, None])[:, None]
        p_s = torch.where(seen, torch.exp(s_s - c), torch.zeros_like(s_s)) * g
        num = num + torch.einsum("bhe,bhed->bhd", p_s, _expand_heads(v_s.float(), H))
        den = den + p_s.sum(-1)
    return num, den, c


__all__ = ["exact_window_decode", "exact_window_parts"]
