"""The sparse global cache: exact key/value pairs from beyond the window, chosen by how badly the state recalls them.

Definition (extends ``naive.py``'s; one kv head, keys indexed as there, ``budget = K``):

* **Recall error.** When key ``j`` leaves the window it is scored against the state of every earlier key,
  ``S_<j = S0 + sum_{j' < j} phi(k_j') v_j'^T`` (and ``z_<j``), by how badly that state reproduces its value:
  ``e_j = sum over the kv head's state heads of || v_j - S_<j^T phi(k_j) / (z_<j . phi(k_j) + eps) ||^2``.
  The score is fixed once computed (the state it is read from does not depend on what the cache keeps, see below),
  so training, prefill and decode compute the same numbers.
* **Candidates.** Every real key that has left the window (``j <= i - W`` for query ``i``), except sinks and
  padding. Candidate ``a`` *beats* ``b`` when ``e_a > e_b``, or ``e_a == e_b`` and ``a`` is the later key.
* **Members.** The global cache of query ``i`` holds the (at most) ``K`` candidates that no ``K`` others visible to
  ``i`` beat: the top-``K`` recall errors among keys ``<= i - W``. A key enters when it leaves the window (if it
  beats the weakest member) and, once beaten ``K`` times, never comes back. Decoding keeps exactly this set in a
  ``K``-slot buffer: the key leaving the window replaces the weakest member when it beats it.
* **Output.** Members are exact-softmax keys like the sinks: more terms of the window sums, relative to the window's
  max ``c_i``. The state keeps *every* key beyond the window (sinks and padding excepted); a member's linear term is
  subtracted, so that each key counts once, exactly or linearly::

      num_i = g_h sum_{window, sinks, G(i)} exp(s_ij - c_i) v_j + phi(q_i)^T S_i - sum_{G(i)} (phi(q_i) . phi(k_j)) v_j
      den_i = g_h sum_{window, sinks, G(i)} exp(s_ij - c_i)     + phi(q_i)^T z_i - sum_{G(i)}  phi(q_i) . phi(k_j)
      o_i   = num_i / (den_i + eps)

  which equals folding only the non-members into the state (LoLA's eviction) without re-scoring: the state never
  depends on the selection. With ``K = 0`` this is ``naive.py``'s hybrid attention; with ``K`` at least the number of
  keys it is exact softmax attention over every key (the teacher, with the window's max as the shift).

A global set travels between calls as ``(k [B, Hk, K, d], v [B, Hk, K, D], fk [B, Hs, K, F], pos [B, Hk, K],
score [B, Hk, K])``: positions in the call's key index (``NO_SINK`` and score ``-inf`` for an empty slot).

Forms: :func:`hybrid_attention_global` (training and prefill: queries in blocks, every key scored densely, O(T * Tk)
time, O(block * Tk) memory) and :func:`global_decode_step` (one token, fixed-size buffers, no host syncs: CUDA
graph capturable). Both are PyTorch (fp32 arithmetic); the decode step has a fused Triton twin
(``global_decode.py``, ``backend="triton"``); the chunked Triton kernels do not take a global cache yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.backend import pick_backend
from linearize.kernels.hybrid.exact import exact_window_decode
from linearize.kernels.hybrid.naive import (
    NO_SINK,
    Sinks,
    State,
    _check_shapes,
    _check_sinks,
    _expand_heads,
    _sink_terms,
)

GlobalSet = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""(k [B, Hk, K, d], v [B, Hk, K, D], fk [B, Hs, K, F], pos [B, Hk, K] int64, score [B, Hk, K] fp32)."""


def empty_global_set(B: int, Hk: int, Hs: int, K: int, d: int, D: int, F: int, *, dtype: torch.dtype,
                     device: torch.device | str) -> GlobalSet:
    """``K`` empty slots (score ``-inf``, position ``NO_SINK``)."""
    return (torch.zeros(B, Hk, K, d, dtype=dtype, device=device), torch.zeros(B, Hk, K, D, dtype=dtype, device=device),
            torch.zeros(B, Hs, K, F, dtype=dtype, device=device),
            torch.full((B, Hk, K), NO_SINK, dtype=torch.long, device=device),
            torch.full((B, Hk, K), float("-inf"), dtype=torch.float32, device=device))


def recall_errors(fk: Tensor, v: Tensor, initial_state: State | None = None, *, eps: float = 1e-6,
                  chunk: int = 128) -> Tensor:
    """``e_j`` of the module docstring for every key: ``fk [B, Hs, Tk, F]`` (zero rows for sinks and padding),
    ``v [B, Hk, Tk, D]``, the state before key 0 -> ``[B, Hk, Tk]`` fp32 (no gradient: it only selects)."""
    with torch.no_grad():
        fk, v = fk.float(), v.float()
        B, Hs, Tk, F = fk.shape
        Hk, D = v.shape[1], v.shape[-1]
        v_s = _expand_heads(v, Hs)
        if initial_state is None:
            S, z = fk.new_zeros(B, Hs, F, D), fk.new_zeros(B, Hs, F)
        else:
            S, z = initial_state[0].float(), initial_state[1].float()
        err = fk.new_empty(B, Hs, Tk)
        for t0 in range(0, Tk, chunk):
            t1 = min(Tk, t0 + chunk)
            f, x = fk[:, :, t0:t1], v_s[:, :, t0:t1]
            a = (f @ f.transpose(-1, -2)).tril(-1)  # strictly earlier keys of the chunk
            num = torch.einsum("bhtf,bhfd->bhtd", f, S) + a @ x
            den = torch.einsum("bhtf,bhf->bht", f, z) + a.sum(-1)
            err[:, :, t0:t1] = (x - num / (den + eps)[..., None]).square().sum(-1)
            S = S + f.transpose(-1, -2) @ x
            z = z + f.sum(2)
        return err.view(B, Hk, Hs // Hk, Tk).sum(2)


def _beats(score_a: Tensor, pos_a: Tensor, score_b: Tensor, pos_b: Tensor) -> Tensor:
    return (score_a > score_b) | ((score_a == score_b) & (pos_a > pos_b))


def membership_ends(score: Tensor, pos: Tensor, eligible: Tensor, budget: int, block: int = 512) -> Tensor:
    """For each candidate, how many leading candidates can be visible while it is still a member: ``[B, Hk, N]``.

    Candidate ``n`` (in increasing ``pos``) is in the cache of a query that sees the first ``L`` candidates exactly when
    it is eligible and ``n < L <= end[n]``: the number of eligible candidates among the first ``L`` that beat it only
    grows with ``L``, and it stays a member while that number is below ``budget``. O(N^2) once per call, in blocks
    of ``block`` candidates."""
    B, Hk, N = score.shape
    ends = torch.zeros(B, Hk, N, dtype=torch.long, device=score.device)
    for n0 in range(0, N, block):
        n1 = min(N, n0 + block)
        beat = _beats(score[..., :, None], pos[..., :, None], score[..., None, n0:n1], pos[..., None, n0:n1])
        beat = beat & eligible[..., :, None]  # [B, Hk, N (beater), n (beaten)]
        ends[..., n0:n1] = (beat.int().cumsum(2) < budget).sum(2)  # prefixes with fewer than K beaters
    return ends


def global_members(score: Tensor, pos: Tensor, eligible: Tensor, visible: Tensor, budget: int,
                   ends: Tensor | None = None) -> Tensor:
    """Which candidates are in each query's global cache.

    Args:
        score / pos / eligible: ``[B, Hk, N]`` per candidate, candidates in increasing ``pos``.
        visible: ``[R]`` int64, how many leading candidates query ``r`` can see (those that left its window).
        budget: ``K``.
        ends: :func:`membership_ends` of these candidates, when already computed.

    Returns:
        ``[B, Hk, R, N]`` bool: candidate ``n`` is a member for query ``r`` (eligible, visible, beaten by fewer than
        ``K`` eligible visible candidates).
    """
    if ends is None:
        ends = membership_ends(score, pos, eligible, budget)
    n = torch.arange(score.shape[-1], device=score.device)
    L = visible[:, None]  # [R, 1]
    return eligible[..., None, :] & (n < L)[None, None] & (L[None, None] <= ends[..., None, :])


def _candidates(k, v, fk, initial_global: GlobalSet | None, errors: Tensor, eligible: Tensor):
    """The previous global set's slots followed by this call's keys: (k, v, fk, pos, score, eligible, K0)."""
    B, Hk, Tk = errors.shape
    pos = torch.arange(Tk, device=v.device).expand(B, Hk, Tk)
    elig = eligible[:, None, :].expand(B, Hk, Tk)
    if initial_global is None:
        return k, v, fk, pos, errors, elig, 0
    gk, gv, gfk, gpos, gscore = initial_global
    K0 = gscore.shape[-1]
    order = torch.argsort(torch.where(torch.isfinite(gscore), gpos, torch.full_like(gpos, -NO_SINK)), dim=-1)
    take = lambda x, o: torch.gather(x, 2, o[..., None].expand(*o.shape, x.shape[-1]))
    g_order_s = order.repeat_interleave(fk.shape[1] // Hk, 1)
    gk, gv, gfk = take(gk, order), take(gv, order), take(gfk, g_order_s)
    gpos, gscore = torch.gather(gpos, 2, order), torch.gather(gscore, 2, order)
    gpos = torch.where(torch.isfinite(gscore), gpos, torch.full_like(gpos, -NO_SINK))
    return (torch.cat([gk.to(k.dtype), k], 2), torch.cat([gv.to(v.dtype), v], 2), torch.cat([gfk.to(fk.dtype), fk], 2),
            torch.cat([gpos, pos], 2), torch.cat([gscore, errors], 2), torch.cat([torch.isfinite(gscore), elig], 2),
            K0)


def eligible_keys(B: int, Tk: int, key_mask: Tensor | None, sinks: Sinks | None, device) -> Tensor:
    """[B, Tk] bool: real keys that are not sinks (the only ones that can enter the global cache)."""
    ok = torch.ones(B, Tk, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool().clone()
    if sinks is not None:
        spos = sinks[2].long()
        j = torch.arange(Tk, device=device)
        ok &= ~(spos[:, :, None] == j[None, None, :]).any(1)
    return ok


def hybrid_attention_global(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor,
    *,
    window: int,
    scale: float,
    budget: int,
    key_mask: Tensor | None = None,
    initial_state: State | None = None,
    initial_global: GlobalSet | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    sinks: Sinks | None = None,
    block: int = 256,
    linear: bool = True,
) -> tuple[Tensor, State | None, GlobalSet | None]:
    """Hybrid attention with a global cache of ``budget`` keys (module docstring); layouts as ``naive.py``.

    ``fk`` must already be zero for sinks (``sinks.sequence_sinks``). ``initial_global``: the global set before
    this call (positions in this call's key index, so negative). Returns ``(o, final state, final global set)``; the
    last two only with ``output_final_state`` (the state covers keys ``<= Tk - W``, every real non-sink one; the set
    is the next query's). ``linear=False`` drops the state's terms from numerator and normaliser (the exact part
    alone: sinks, window, members), while the members are still chosen by the state's recall errors.
    """
    B, H, T, Hk, Tk, Hs = _check_shapes(q, k, v, fq, fk, gamma, window)
    _check_sinks(sinks, B, Hk, q, v, window)
    if window <= 0 or budget < 1:
        raise ValueError(f"a global cache needs window > 0 and budget >= 1 (window={window}, budget={budget})")
    out_dtype = v.dtype
    P = Tk - T
    dev = v.device
    real = key_mask.bool() if key_mask is not None else None
    if real is not None:
        fk = fk * real[:, None, :, None].to(fk.dtype)
        v = v * real[:, None, :, None].to(v.dtype)
    S0 = initial_state[0].float() if initial_state is not None else fk.new_zeros(B, Hs, fk.shape[-1], v.shape[-1]).float()
    z0 = initial_state[1].float() if initial_state is not None else fk.new_zeros(B, Hs, fk.shape[-1]).float()
    eligible = eligible_keys(B, Tk, real, sinks, dev)
    errors = recall_errors(fk, v, (S0, z0), eps=eps)
    ck, cv, cfk, cpos, cscore, celig, K0 = _candidates(k, v, fk, initial_global, errors, eligible)
    N = K0 + Tk
    ends = membership_ends(cscore, cpos, celig, budget)

    q32, k32, v32, fq32, fk32 = q.float(), ck.float(), cv.float(), fq.float(), cfk.float()
    g = gamma.float()[None, :, None, None]
    key_ok = real if real is not None else torch.ones(B, Tk, dtype=torch.bool, device=dev)
    S0h, z0h = _expand_heads(S0, H), _expand_heads(z0, H)
    out = torch.empty(B, H, T, v.shape[-1], dtype=torch.float32, device=dev)
    jc = torch.arange(N, device=dev) - K0  # candidate -> key index (initial slots negative)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        i = torch.arange(t0, t1, device=dev) + P  # key index of each query
        visible = K0 + (i - window + 1).clamp(0, Tk)  # leading candidates that left the window
        member = _expand_heads(global_members(cscore, cpos, celig, visible, budget, ends), H)  # [B, H, R, N]
        win = ((jc[None, :] <= i[:, None]) & (jc[None, :] > i[:, None] - window) & (jc[None, :] >= 0))[None, None]
        win = win & torch.cat([torch.zeros(B, K0, dtype=torch.bool, device=dev), key_ok], 1)[:, None, None, :]
        s = torch.einsum("bhtd,bhnd->bhtn", q32[:, :, t0:t1], _expand_heads(k32, H)) * scale
        c = s.masked_fill(~win, float("-inf")).amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        p = torch.exp(s.masked_fill(~(win | member), float("-inf")) - c) * g
        lin = (jc[None, :] <= i[:, None] - window)[None, None] & ~member  # [B, H, R, N]
        lin = lin & (jc >= 0)[None, None, None, :]  # the previous slots are in S0 already: only subtracted
        a = torch.einsum("bhtf,bhnf->bhtn", fq32[:, :, t0:t1], _expand_heads(fk32, H))
        a_net = torch.where(lin, a, torch.zeros_like(a)) - torch.where(member & (jc < 0)[None, None, None, :], a,
                                                                     torch.zeros_like(a))
        w = p + a_net if linear else p
        num = w @ _expand_heads(v32, H)
        den = w.sum(-1)
        if linear:
            num = num + torch.einsum("bhtf,bhfd->bhtd", fq32[:, :, t0:t1], S0h)
            den = den + torch.einsum("bhtf,bhf->bht", fq32[:, :, t0:t1], z0h)
        if sinks is not None:
            n_s, d_s = _sink_terms(q32[:, :, t0:t1], i, c, sinks, g, scale, window)
            num, den = num + n_s, den + d_s
        out[:, :, t0:t1] = num / (den + eps)[..., None]
    if not output_final_state:
        return out.to(out_dtype), None, None
    n = max(0, min(Tk, Tk - window + 1))  # keys that left the window for the next query
    v_s = _expand_heads(v.float(), Hs)
    state = (S0 + torch.einsum("bhtf,bhtd->bhfd", fk[:, :, :n].float(), v_s[:, :, :n]),
             z0 + fk[:, :, :n].float().sum(2))
    visible = torch.tensor([K0 + n], device=dev)
    member = global_members(cscore, cpos, celig, visible, budget, ends)[:, :, 0]  # [B, Hk, N]
    # members first, in position order, then the empty slots
    order = torch.argsort((~member).int() * 2 * N + torch.arange(N, device=dev), dim=-1)[..., :budget]
    if order.shape[-1] < budget:  # fewer candidates than slots
        order = torch.cat([order, order.new_zeros(B, Hk, budget - order.shape[-1])], -1)
        keep = torch.arange(budget, device=dev) < N
    else:
        keep = torch.ones(budget, dtype=torch.bool, device=dev)
    is_member = torch.gather(member, 2, order) & keep
    take = lambda x, o: torch.gather(x, 2, o[..., None].expand(*o.shape, x.shape[-1]))
    gk, gv = take(ck, order), take(cv, order)
    gfk = take(cfk, order.repeat_interleave(Hs // Hk, 1))
    gpos = torch.where(is_member, torch.gather(cpos, 2, order), torch.full_like(order, NO_SINK))
    gscore = torch.where(is_member, torch.gather(cscore, 2, order), torch.full_like(gpos, 0, dtype=torch.float32)
                         - float("inf"))
    return out.to(out_dtype), state, (gk, gv, gfk, gpos, gscore)


def global_decode_step(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, *, state: State,
                       k_cache: Tensor, v_cache: Tensor, fk_cache: Tensor, pos: Tensor, window: int, scale: float,
                       global_set: GlobalSet, eps: float = 1e-6, sinks: Sinks | None = None,
                       linear: bool = True, backend: str = "torch") -> Tensor:
    """One token per sequence (``[B, heads, 1, dim]`` inputs), the ring-buffer contract of ``decode_torch.py``
    plus the global set, all updated in place: write the new key into the ring, read window + sinks + members +
    state minus the members' linear terms, then score the key leaving the window against the state, let it replace
    the weakest member when it beats it, and fold it into the state. ``pos [B]``: the new token's position (the
    caller advances it); positions in ``global_set`` and ``sinks`` are in the same coordinates. Returns o [B, H, 1, D].
    ``linear=False``: the exact part alone, as in :func:`hybrid_attention_global` (the state is still kept).
    ``backend``: "torch" (this function, the reference), "triton" (the fused kernel of ``global_decode.py``, also on
    CPU tensors under ``TRITON_INTERPRET=1``) or "auto" (Triton for CUDA tensors when it imports); the rule of
    ``kernels.backend.pick_backend``, as ``hybrid_decode_step`` applies it.
    """
    from linearize.kernels import HAS_TRITON  # at call time (the package may still be loading when this one is)

    if pick_backend(backend, v, has_triton=HAS_TRITON) == "triton":
        from linearize.kernels.hybrid.global_decode import global_decode_step_triton

        return global_decode_step_triton(q, k, v, fq, fk, gamma, state=state, k_cache=k_cache, v_cache=v_cache,
                                         fk_cache=fk_cache, pos=pos, window=window, scale=scale,
                                         global_set=global_set, eps=eps, sinks=sinks, linear=linear)
    q, k, v, fq, fk = (x[:, :, 0] if x.dim() == 4 else x for x in (q, k, v, fq, fk))
    S, z = state
    gk, gv, gfk, gpos, gscore = global_set
    B, H, _ = fq.shape
    Hk, Hs, W = v.shape[1], fk.shape[1], window
    bidx = torch.arange(B, device=v.device)
    i = pos.long()
    slot_new = i % W
    k_cache[bidx, :, slot_new] = k.to(k_cache.dtype)
    v_cache[bidx, :, slot_new] = v.to(v_cache.dtype)
    fk_cache[bidx, :, slot_new] = fk.to(fk_cache.dtype)
    num, den, c = exact_window_decode(q, k_cache, v_cache, gamma, pos, window=W, scale=scale, sinks=sinks)
    g = gamma.float()[None, :, None]
    q32, fq32 = q.float(), fq.float()
    filled = _expand_heads(torch.isfinite(gscore)[..., None], H)[..., 0]  # [B, H, K]
    s_g = torch.einsum("bhd,bhkd->bhk", q32, _expand_heads(gk.float(), H)) * scale
    p_g = torch.where(filled, torch.exp(s_g - c), torch.zeros_like(s_g)) * g
    a_g = torch.where(filled, torch.einsum("bhf,bhkf->bhk", fq32, _expand_heads(gfk.float(), H)),
                      torch.zeros_like(s_g))
    w_g = p_g - a_g if linear else p_g
    num = num + torch.einsum("bhk,bhkd->bhd", w_g, _expand_heads(gv.float(), H))
    den = den + w_g.sum(-1)
    if linear:
        num = num + torch.einsum("bhf,bhfd->bhd", fq32, _expand_heads(S, H))
        den = den + torch.einsum("bhf,bhf->bh", fq32, _expand_heads(z, H))
    o = (num / (den + eps)[..., None]).to(v.dtype)[:, :, None]

    # the key leaving the window: j_old = i - W + 1 (slot (i + 1) % W), if it exists and is no sink
    j_old = i - W + 1
    slot_old = (i + 1) % W
    live = j_old >= 0
    if sinks is not None:
        live = live & ~(sinks[2].long() == j_old[:, None]).any(-1)
    f_old = fk_cache[bidx, :, slot_old].float() * live[:, None, None]  # [B, Hs, F]
    k_old, v_old = k_cache[bidx, :, slot_old], v_cache[bidx, :, slot_old]  # [B, Hk, d|D]
    v_old_s = _expand_heads(v_old.float(), Hs)
    rec = torch.einsum("bhf,bhfd->bhd", f_old, S) / (torch.einsum("bhf,bhf->bh", f_old, z) + eps)[..., None]
    err = (v_old_s - rec).square().sum(-1).view(B, Hk, Hs // Hk).sum(-1)  # [B, Hk]
    # the weakest member: lowest score, the earlier key on ties
    low = gscore.amin(-1, keepdim=True)
    weakest = torch.where(gscore == low, gpos, torch.full_like(gpos, NO_SINK + 1)).argmin(-1, keepdim=True)
    w_score, w_pos = torch.gather(gscore, 2, weakest)[..., 0], torch.gather(gpos, 2, weakest)[..., 0]
    enter = live[:, None] & _beats(err, j_old[:, None].expand(B, Hk), w_score, w_pos)  # [B, Hk]
    hit = (torch.arange(gscore.shape[-1], device=v.device) == weakest) & enter[..., None]  # [B, Hk, K]
    gk.copy_(torch.where(hit[..., None], k_old[:, :, None].to(gk.dtype), gk))
    gv.copy_(torch.where(hit[..., None], v_old[:, :, None].to(gv.dtype), gv))
    hit_s = _expand_heads(hit, Hs)
    gfk.copy_(torch.where(hit_s[..., None], f_old[:, :, None].to(gfk.dtype), gfk))
    gpos.copy_(torch.where(hit, j_old[:, None, None].expand_as(gpos), gpos))
    gscore.copy_(torch.where(hit, err[..., None].expand_as(gscore), gscore))
    S += f_old[..., None] * v_old_s[:, :, None, :]
    z += f_old
    return o


__all__ = [
    "GlobalSet",
    "eligible_keys",
    "empty_global_set",
    "global_decode_step",
    "global_members",
    "hybrid_attention_global",
    "membership_ends",
    "recall_errors",
]
