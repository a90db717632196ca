"""PyTorch reference for one decoding step over ring-buffer caches (no triton needed); the cache layout and the
in-place contract are described in ``decode.py``. Tested against ``naive.hybrid_attention_chunked``."""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.hybrid.exact import exact_window_decode


def _squeeze_t(x: Tensor | None) -> Tensor | None:
    """Accept [B, heads, 1, dim] or [B, heads, dim]; return [B, heads, dim] contiguous."""
    if x is None:
        return None
    if x.dim() == 4:
        if x.shape[2] != 1:
            raise ValueError(f"decode takes one token per sequence, got T={x.shape[2]} in shape {tuple(x.shape)}")
        x = x[:, :, 0]
    return x.contiguous()


def _check_decode(q, k, v, fq, fk, gamma, state, k_cache, v_cache, fk_cache, pos, window):
    B, H, F = fq.shape
    _, Hk, D = v.shape
    Hs = fk.shape[1]
    if H % Hs or Hs % Hk:
        raise ValueError(f"heads must nest: query heads {H}, state heads {Hs}, key heads {Hk}")
    S, z = state
    if S.shape != (B, Hs, F, D) or z.shape != (B, Hs, F) or S.dtype != torch.float32 or z.dtype != torch.float32:
        raise ValueError(f"state must be fp32 (S [B, Hs, F, D] = {(B, Hs, F, D)}, z [B, Hs, F]); got "
                         f"{tuple(S.shape)} {S.dtype}, {tuple(z.shape)} {z.dtype}")
    if not (S.is_contiguous() and z.is_contiguous()):
        raise ValueError("state tensors are updated in place and must be contiguous")
    if pos.shape != (B,):
        raise ValueError(f"pos must have shape ({B},), got {tuple(pos.shape)}")
    if window > 0:
        d = q.shape[-1]
        want = {"k_cache": (B, Hk, window, d), "v_cache": (B, Hk, window, D), "fk_cache": (B, Hs, window, F)}
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("fk_cache", fk_cache)):
            if x is None or tuple(x.shape) != want[name] or not x.is_contiguous():
                got = None if x is None else tuple(x.shape)
                raise ValueError(f"{name} must be a contiguous ring buffer of shape {want[name]} (window={window}), got {got}")
    return B, H, Hk, Hs, F, D


def sink_arguments(sinks, B: int, Hk: int, DK: int, D: int, placeholder: Tensor, pos_dtype=torch.int32):
    """``(k_s, v_s, sink_pos, E)`` for a decode kernel: the sinks ``(k [B, Hk, E, d], v [B, Hk, E, D], pos [B, E])``
    checked and made contiguous (positions as ``pos_dtype``), or ``placeholder`` three times and ``E = 0`` (never read
    then) without sinks."""
    if sinks is None:
        return placeholder, placeholder, placeholder, 0
    ks, vs, spos = sinks
    E = spos.shape[-1]
    if ks.shape != (B, Hk, E, DK) or vs.shape != (B, Hk, E, D) or spos.shape != (B, E):
        raise ValueError(f"sinks need k [B, Hk, E, d], v [B, Hk, E, D], pos [B, E] = {(B, Hk, E)}; "
                         f"got {tuple(ks.shape)}, {tuple(vs.shape)}, {tuple(spos.shape)}")
    return ks.contiguous(), vs.contiguous(), spos.to(pos_dtype).contiguous(), E


def _check_window_decode(q, k, v, gamma, k_cache, v_cache, pos, window):
    """Shapes of a window-only step (:func:`window_decode_step_torch`): q [B, H, d], k [B, Hk, d], v [B, Hk, D]."""
    B, H, d = q.shape
    _, Hk, D = v.shape
    if window < 1:
        raise ValueError(f"a window-only step needs window >= 1, got {window}")
    if H % Hk or k.shape != (B, Hk, d):
        raise ValueError(f"k must be [B, Hk, d] = {(B, Hk, d)} with Hk dividing the {H} query heads, got "
                         f"{tuple(k.shape)}")
    if gamma is None or gamma.shape != (H,):
        raise ValueError(f"gamma must have shape ({H},), got {None if gamma is None else tuple(gamma.shape)}")
    if pos.shape != (B,):
        raise ValueError(f"pos must have shape ({B},), got {tuple(pos.shape)}")
    for name, x, want in (("k_cache", k_cache, (B, Hk, window, d)), ("v_cache", v_cache, (B, Hk, window, D))):
        if x is None or tuple(x.shape) != want or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ring buffer of shape {want} (window={window}), got "
                             f"{None if x is None else tuple(x.shape)}")
    return B, H, Hk, D


def window_decode_step_torch(q, k, v, gamma, *, k_cache, v_cache, pos, window, scale, eps=1e-6, out=None,
                             sinks=None):
    """PyTorch step of a layer's exact part alone (the contract of ``decode.window_decode_step``): the new key and
    value go into slot ``pos % W``, then ``exact_window_decode``'s terms over the ring and the sinks, divided as
    the hybrid step divides them (its state terms are zero)."""
    q, k, v = (_squeeze_t(x) for x in (q, k, v))
    B, H, Hk, D = _check_window_decode(q, k, v, gamma, k_cache, v_cache, pos, window)
    bidx = torch.arange(B, device=v.device)
    slot = pos.long() % window
    k_cache[bidx, :, slot] = k.to(k_cache.dtype)
    v_cache[bidx, :, slot] = v.to(v_cache.dtype)
    num, den, _ = exact_window_decode(q, k_cache, v_cache, gamma, pos, window=window, scale=scale, sinks=sinks)
    o = (num / (den + eps)[..., None]).to(v.dtype)[:, :, None]
    if out is None:
        return o
    out.view(o.shape).copy_(o)
    return out if out.dim() == 4 else out.view(o.shape)


def hybrid_decode_step_torch(q, k, v, fq, fk, gamma, *, state, k_cache, v_cache, fk_cache, pos, window, scale, eps=1e-6,
                             out=None, sinks=None):
    """Vectorised PyTorch step with the same in-place contract as ``hybrid_decode_step`` (fp32 arithmetic);
    ``out`` optionally receives the output (any shape with B * H * D elements)."""
    o = _step(q, k, v, fq, fk, gamma, state=state, k_cache=k_cache, v_cache=v_cache, fk_cache=fk_cache, pos=pos,
              window=window, scale=scale, eps=eps, sinks=sinks)
    if out is None:
        return o
    out.view(o.shape).copy_(o)
    return out if out.dim() == 4 else out.view(o.shape)


def _step(q, k, v, fq, fk, gamma, *, state, k_cache, v_cache, fk_cache, pos, window, scale, eps, sinks):
    q, k, v, fq, fk = (_squeeze_t(x) for x in (q, k, v, fq, fk))
    B, H, Hk, Hs, F, D = _check_decode(q, k, v, fq, fk, gamma, state, k_cache, v_cache, fk_cache, pos, window)
    S, z = state
    rs, rk = H // Hs, Hs // Hk
    bidx = torch.arange(B, device=v.device)
    v_s = v.float().repeat_interleave(rk, 1)  # [B, Hs, D]
    if window == 0:
        S += fk.float()[..., None] * v_s[:, :, None, :]
        z += fk.float()
        num = torch.einsum("bhf,bhfd->bhd", fq.float(), S.repeat_interleave(rs, 1))
        den = torch.einsum("bhf,bhf->bh", fq.float(), z.repeat_interleave(rs, 1))
        return (num / (den + eps)[..., None]).to(v.dtype)[:, :, None]
    W = window
    i = pos.long()
    slot_new = i % W
    k_cache[bidx, :, slot_new] = k.to(k_cache.dtype)
    v_cache[bidx, :, slot_new] = v.to(v_cache.dtype)
    fk_cache[bidx, :, slot_new] = fk.to(fk_cache.dtype)
    r = torch.arange(W, device=v.device)
    j = i[:, None] - ((i[:, None] - r[None, :]) % W)  # [B, W] key index held by each slot
    ok = j >= 0
    kh = k_cache.float().repeat_interleave(H // Hk, 1)  # [B, H, W, d]
    vh = v_cache.float().repeat_interleave(H // Hk, 1)
    s = torch.einsum("bhd,bhwd->bhw", q.float(), kh) * scale
    s = s.masked_fill(~ok[:, None], float("-inf"))
    c = s.amax(-1, keepdim=True)
    p = torch.exp(s - c) * gamma.float()[None, :, None]
    num = torch.einsum("bhw,bhwd->bhd", p, vh) + torch.einsum("bhf,bhfd->bhd", fq.float(), S.repeat_interleave(rs, 1))
    den = p.sum(-1) + torch.einsum("bhf,bhf->bh", fq.float(), z.repeat_interleave(rs, 1))
    if sinks is not None:  # sinks that left the window: more window terms, relative to the window's max c
        k_s, v_s, spos = sinks
        s_s = torch.einsum("bhd,bhed->bhe", q.float(), k_s.float().repeat_interleave(H // Hk, 1)) * scale
        seen = (spos.long() <= (i - W)[:, None])[:, None]  # [B, 1, E]
        p_s = torch.where(seen, torch.exp(s_s - c), torch.zeros_like(s_s)) * gamma.float()[None, :, None]
        num = num + torch.einsum("bhe,bhed->bhd", p_s, v_s.float().repeat_interleave(H // Hk, 1))
        den = den + p_s.sum(-1)
    o = (num / (den + eps)[..., None]).to(v.dtype)[:, :, None]
    # fold key i - W + 1 (slot (i + 1) % W) where it exists
    slot_old = (i + 1) % W
    live = (i - W + 1 >= 0).float()[:, None, None]
    fk_o = fk_cache[bidx, :, slot_old].float() * live  # [B, Hs, F]
    v_o = v_cache[bidx, :, slot_old].float().repeat_interleave(rk, 1) * live
    S += fk_o[..., None] * v_o[:, :, None, :]
    z += fk_o
    return o
