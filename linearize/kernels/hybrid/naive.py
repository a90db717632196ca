"""PyTorch references for causal linear and hybrid (sliding-window softmax + linear) attention.

These are the readable definitions every fast path is tested against. All arithmetic runs in fp32 and the
result is cast back to ``v.dtype``.

Definition (one query head ``h``, query ``i``, keys indexed in the same sequence):

    window(i)  = keys j with i - W < j <= i                    (empty when W == 0)
    linear(i)  = keys j with j <= i - W, plus the initial state
    c_i        = max_{j in window(i)} s_ij,   s_ij = scale * q_i . k_j
    o_i = (g_h * sum_win exp(s_ij - c_i) v_j + phi(q_i)^T S_i) / (g_h * sum_win exp(s_ij - c_i) + phi(q_i)^T z_i + eps)

with ``S_i = sum_{linear(i)} phi(k_j) v_j^T`` and ``z_i = sum_{linear(i)} phi(k_j)`` kept in fp32. ``W == 0`` is pure
linear attention.

Attention sinks (optional ``sinks = (k_s [B, Hk, E, d], v_s [B, Hk, E, D], pos [B, E] int)``): extra exact-softmax keys
at positions ``pos`` (in this call's key index, so possibly negative, or >= ``NO_SINK`` for an empty slot). Sink ``e``
is read by query ``i`` once it has left the window, ``pos_e <= i - W``, as one more term of the window sums
``g_h * sum exp(s_ie - c_i) v_e`` (``c_i`` stays the window's max). The caller keeps sink keys out of the linear
part (their phi(k) is zero): see ``kernels/hybrid/sinks.py``, which picks the first tokens of each sequence.

A key leaves the window and enters the state at exactly one query, in training, prefill and decode alike (see
method-notes: LoLCATs trained with a different window than it decoded with; we do not).

Layout ``[B, heads, T, dim]``:

    q  [B, H,  T,  d]   raw queries after RoPE (read only when W > 0)
    k  [B, Hk, Tk, d]   raw keys; Tk >= T. The last T keys belong to the T queries; the first P = Tk - T keys are a
                        prefix (the cached window during decoding).
    v  [B, Hk, Tk, D]
    fq [B, H,  T,  F]   feature-mapped queries
    fk [B, Hs, Tk, F]   feature-mapped keys. Hs, the number of *state heads*, is Hk (one state per key/value head,
                        phi_k shared within a GQA group) or H (one state per query head, as LoLCATs does).
    gamma [H]           mixing factor in (0, 1) per query head (read only when W > 0)
    key_mask [B, Tk]    bool, False marks padding keys (they touch neither the window nor the state)
    initial_state       (S [B, Hs, F, D], z [B, Hs, F]) fp32: the linear part of every key before k[:, :, 0]

Head mapping: query head h reads key head ``h // (H // Hk)`` and state head ``h // (H // Hs)``; state head s
accumulates values of key head ``s // (Hs // Hk)``.

The final state (returned when ``output_final_state``) covers every key that is linear for the *next* query
(index Tk): keys ``j <= Tk - W``. The window cache then holds the last ``W - 1`` keys, which is exactly what
transformers' ``DynamicSlidingWindowLayer`` keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor

State = tuple[Tensor, Tensor]
Sinks = tuple[Tensor, Tensor, Tensor]
NO_SINK = 2**30
"""Position of an empty sink slot: never visible."""


def _check_shapes(q, k, v, fq, fk, gamma, window):
    B, H, T, _ = fq.shape
    Bk, Hk, Tk, _ = v.shape
    Hs = fk.shape[1]
    if Bk != B or fk.shape[0] != B:
        raise ValueError(f"batch sizes differ: fq {B}, v {Bk}, fk {fk.shape[0]}")
    if Tk < T or fk.shape[2] != Tk:
        raise ValueError(f"need Tk >= T and fk/v of equal length: T={T}, v has {Tk}, fk has {fk.shape[2]}")
    if H % Hs or Hs % Hk:
        raise ValueError(f"heads must nest: query heads {H}, state heads {Hs}, key heads {Hk}")
    if window > 0:
        if q is None or k is None or gamma is None:
            raise ValueError("window > 0 needs q, k and gamma")
        if q.shape[:3] != (B, H, T) or k.shape[:3] != (B, Hk, Tk):
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match fq {tuple(fq.shape)} / v {tuple(v.shape)}")
        if gamma.shape != (H,):
            raise ValueError(f"gamma must have shape ({H},), got {tuple(gamma.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return B, H, T, Hk, Tk, Hs


def _check_sinks(sinks, B, Hk, q, v, window):
    if sinks is None:
        return
    if window <= 0:
        raise ValueError("sinks need window > 0")
    k_s, v_s, pos = sinks
    E = pos.shape[-1]
    if k_s.shape != (B, Hk, E, q.shape[-1]) or v_s.shape != (B, Hk, E, v.shape[-1]) or pos.shape != (B, E):
        raise ValueError(f"sinks must be k [B, Hk, E, d], v [B, Hk, E, D], pos [B, E] = {(B, Hk, E)}; got "
                         f"{tuple(k_s.shape)}, {tuple(v_s.shape)}, {tuple(pos.shape)}")


def _sink_terms(q_rows: Tensor, i_rows: Tensor, c: Tensor, sinks: Sinks, g: Tensor, scale: float, window: int):
    """Sink contributions for query rows ``q_rows [B, H, R, d]`` at key indices ``i_rows [R]``, relative to the
    window max ``c [B, H, R, 1]``: (num [B, H, R, D], den [B, H, R]) in fp32; ``g`` is gamma as [1, H, 1, 1]."""
    k_s, v_s, pos = sinks
    H = q_rows.shape[1]
    s = torch.einsum("bhrd,bhed->bhre", q_rows.float(), _expand_heads(k_s.float(), H)) * scale
    visible = pos.long()[:, None, None, :] <= (i_rows.long() - window)[None, None, :, None]  # [B, 1, R, E]
    p = torch.where(visible, torch.exp(s - c), torch.zeros_like(s)) * g
    return p @ _expand_heads(v_s.float(), H), p.sum(-1)


def _expand_heads(x: Tensor, heads: int) -> Tensor:
    """[B, h, ...] -> [B, heads, ...] by repeating each head heads // h times (GQA grouping)."""
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _fold(fk: Tensor, v: Tensor, Hs: int) -> State:
    """Sum of phi(k) v^T and phi(k) over the time axis: ([B, Hs, F, D], [B, Hs, F])."""
    v_s = _expand_heads(v, Hs)
    return torch.einsum("bhtf,bhtd->bhfd", fk, v_s), fk.sum(dim=2)


def _prep(v, fk, key_mask, initial_state, Hs):
    B, _, _, D = v.shape
    F = fk.shape[-1]
    fk = fk.float()
    v = v.float()
    if key_mask is not None:
        m = key_mask[:, None, :, None].to(fk.dtype)
        fk = fk * m
        v = v * m
    if initial_state is None:
        S0 = fk.new_zeros(B, Hs, F, D)
        z0 = fk.new_zeros(B, Hs, F)
    else:
        S0, z0 = initial_state[0].float(), initial_state[1].float()
    return fk, v, S0, z0


def _final_state(fk, v, S0, z0, Tk, window, Hs) -> State:
    n = min(Tk, Tk - window + 1)
    if n <= 0:
        return S0.clone(), z0.clone()
    S, z = _fold(fk[:, :, :n], v[:, :, :n], Hs)
    return S0 + S, z0 + z


def hybrid_attention_quadratic(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor | None = None,
    *,
    window: int,
    scale: float,
    key_mask: Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    sinks: Sinks | None = None,
) -> tuple[Tensor, State | None]:
    """O(T * Tk) masked reference: materialises every score. For tests only."""
    B, H, T, Hk, Tk, Hs = _check_shapes(q, k, v, fq, fk, gamma, window)
    _check_sinks(sinks, B, Hk, q, v, window)
    out_dtype = v.dtype
    fk, v, S0, z0 = _prep(v, fk, key_mask, initial_state, Hs)
    P = Tk - T
    i = torch.arange(T, device=v.device)[:, None] + P  # absolute key index of each query
    j = torch.arange(Tk, device=v.device)[None, :]
    lin_mask = j <= i - window  # [T, Tk]

    fq32 = fq.float()
    a_lin = torch.einsum("bhtf,bhsf->bhts", fq32, _expand_heads(fk, H)) * lin_mask  # [B, H, T, Tk]
    v_h = _expand_heads(v, H)
    num = a_lin @ v_h + torch.einsum("bhtf,bhfd->bhtd", fq32, _expand_heads(S0, H))
    den = a_lin.sum(-1) + torch.einsum("bhtf,bhf->bht", fq32, _expand_heads(z0, H))

    if window > 0:
        win_mask = (j <= i) & (j > i - window)
        if key_mask is not None:
            win_mask = win_mask & key_mask[:, None, None, :]
        else:
            win_mask = win_mask.expand(B, 1, T, Tk)
        s = torch.einsum("bhtd,bhsd->bhts", q.float(), _expand_heads(k.float(), H)) * scale
        s = s.masked_fill(~win_mask, float("-inf"))
        c = s.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        if sinks is not None:  # the sink keys as more columns, visible once out of the window (max unchanged)
            k_s, v_s, pos = sinks
            s_sink = torch.einsum("bhtd,bhsd->bhts", q.float(), _expand_heads(k_s.float(), H)) * scale
            seen = pos.long()[:, None, None, :] <= (i - window)[None, None]  # [B, 1, T, E]
            s = torch.cat([s, s_sink.masked_fill(~seen, float("-inf"))], dim=-1)
            v_h = torch.cat([v_h, _expand_heads(v_s.float(), H)], dim=2)
        p = torch.exp(s - c) * gamma.float()[None, :, None, None]
        num = num + p @ v_h
        den = den + p.sum(-1)

    o = (num / (den + eps)[..., None]).to(out_dtype)
    state = _final_state(fk, v, S0, z0, Tk, window, Hs) if output_final_state else None
    return o, state


def hybrid_attention_chunked(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor | None = None,
    *,
    window: int,
    scale: float,
    key_mask: Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    sinks: Sinks | None = None,
) -> tuple[Tensor, State | None]:
    """Chunked O(T * (C + W)) form: the CPU training and prefill path.

    The linear part is causal linear attention over a *shifted* key sequence: the key that becomes linear at query
    t is ``k[P + t - W]``. Keys before that (the prefix up to ``P - W``) are folded into the state up front.
    """
    B, H, T, Hk, Tk, Hs = _check_shapes(q, k, v, fq, fk, gamma, window)
    _check_sinks(sinks, B, Hk, q, v, window)
    out_dtype = v.dtype
    fk, v, S, z = _prep(v, fk, key_mask, initial_state, Hs)
    P = Tk - T
    D = v.shape[-1]

    # Keys already linear for query 0: indices [0, P - W].
    n0 = max(0, min(Tk, P - window + 1))
    if n0:
        S_add, z_add = _fold(fk[:, :, :n0], v[:, :, :n0], Hs)
        S, z = S + S_add, z + z_add
    # Shifted sequence: slot t holds the key that becomes linear at query t (zero where there is none).
    u = torch.arange(T, device=v.device) + P - window
    valid = (u >= n0) & (u < Tk)
    u_c = u.clamp(0, Tk - 1)
    fk_lin = fk[:, :, u_c] * valid[None, None, :, None]
    v_lin = v[:, :, u_c] * valid[None, None, :, None]

    fq32 = fq.float()
    if window > 0:
        q32, k32 = q.float(), k.float()
        key_ok = key_mask if key_mask is not None else torch.ones(B, Tk, dtype=torch.bool, device=v.device)
        g = gamma.float()[None, :, None, None]
    rep_s = H // Hs
    out = torch.empty(B, H, T, D, dtype=torch.float32, device=v.device)
    for t0 in range(0, T, chunk_size):
        t1 = min(T, t0 + chunk_size)
        C = t1 - t0
        fq_c = fq32[:, :, t0:t1]  # [B, H, C, F]
        fk_c = fk_lin[:, :, t0:t1]  # [B, Hs, C, F]
        v_c = v_lin[:, :, t0:t1]  # [B, Hk, C, D]
        causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
        a = torch.einsum("bhtf,bhsf->bhts", fq_c, _expand_heads(fk_c, H)) * causal
        num = a @ _expand_heads(v_c, H) + torch.einsum("bhtf,bhfd->bhtd", fq_c, S.repeat_interleave(rep_s, 1))
        den = a.sum(-1) + torch.einsum("bhtf,bhf->bht", fq_c, z.repeat_interleave(rep_s, 1))
        S_add, z_add = _fold(fk_c, v_c, Hs)
        S, z = S + S_add, z + z_add

        if window > 0:
            # Keys visible to this chunk's window: absolute [P + t0 - W + 1, P + t1 - 1].
            ks = max(0, P + t0 - window + 1)
            ke = P + t1
            s = torch.einsum("bhtd,bhsd->bhts", q32[:, :, t0:t1], _expand_heads(k32[:, :, ks:ke], H)) * scale
            i = torch.arange(t0, t1, device=v.device)[:, None] + P
            j = torch.arange(ks, ke, device=v.device)[None, :]
            m = ((j <= i) & (j > i - window))[None, None] & key_ok[:, None, None, ks:ke]
            s = s.masked_fill(~m, float("-inf"))
            c = s.amax(-1, keepdim=True)
            c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
            p = torch.exp(s - c) * g
            num = num + p @ _expand_heads(v[:, :, ks:ke], H)
            den = den + p.sum(-1)
            if sinks is not None:
                n_s, d_s = _sink_terms(q32[:, :, t0:t1], i[:, 0], c, sinks, g, scale, window)
                num, den = num + n_s, den + d_s
        out[:, :, t0:t1] = num / (den + eps)[..., None]

    state = None
    if output_final_state:
        u_last = P + T - window  # the key that would become linear at the next query
        if n0 <= u_last < Tk and T > 0:
            S_add, z_add = _fold(fk[:, :, u_last : u_last + 1], v[:, :, u_last : u_last + 1], Hs)
            S, z = S + S_add, z + z_add
        state = (S, z)
    return out.to(out_dtype), state


def hybrid_attention_recurrent(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor | None = None,
    *,
    window: int,
    scale: float,
    key_mask: Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    sinks: Sinks | None = None,
) -> tuple[Tensor, State | None]:
    """Token-by-token form, what decoding does: per query, one key enters the state, then the output is read from
    the state plus the (at most W) keys of the window and the sinks that left it."""
    B, H, T, Hk, Tk, Hs = _check_shapes(q, k, v, fq, fk, gamma, window)
    _check_sinks(sinks, B, Hk, q, v, window)
    out_dtype = v.dtype
    fk, v, S, z = _prep(v, fk, key_mask, initial_state, Hs)
    P = Tk - T
    n0 = max(0, min(Tk, P - window + 1))
    if n0:
        S_add, z_add = _fold(fk[:, :, :n0], v[:, :, :n0], Hs)
        S, z = S + S_add, z + z_add
    rep = H // Hs
    outs = []
    for t in range(T):
        i = P + t
        u = i - window  # the key that becomes linear at this query
        if n0 <= u < Tk:
            S_add, z_add = _fold(fk[:, :, u : u + 1], v[:, :, u : u + 1], Hs)
            S, z = S + S_add, z + z_add
        fq_t = fq[:, :, t].float()  # [B, H, F]
        num = torch.einsum("bhf,bhfd->bhd", fq_t, S.repeat_interleave(rep, 1))
        den = torch.einsum("bhf,bhf->bh", fq_t, z.repeat_interleave(rep, 1))
        if window > 0:
            ws = max(0, i - window + 1)
            s = torch.einsum("bhd,bhsd->bhs", q[:, :, t].float(), _expand_heads(k[:, :, ws : i + 1].float(), H)) * scale
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, ws : i + 1], float("-inf"))
            c = s.amax(-1, keepdim=True)
            c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
            p = torch.exp(s - c) * gamma.float()[None, :, None]
            num = num + torch.einsum("bhs,bhsd->bhd", p, _expand_heads(v[:, :, ws : i + 1], H))
            den = den + p.sum(-1)
            if sinks is not None:
                i_row = torch.tensor([i], device=v.device)
                n_s, d_s = _sink_terms(q[:, :, t : t + 1], i_row, c[..., None], sinks,
                                       gamma.float()[None, :, None, None], scale, window)
                num, den = num + n_s[:, :, 0], den + d_s[:, :, 0]
        outs.append(num / (den + eps)[..., None])
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    state = None
    if output_final_state:
        u = P + T - window
        if T > 0 and n0 <= u < Tk:
            S_add, z_add = _fold(fk[:, :, u : u + 1], v[:, :, u : u + 1], Hs)
            S, z = S + S_add, z + z_add
        state = (S, z)
    return o.to(out_dtype), state
