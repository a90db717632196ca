"""One decoding step over the sparse global cache: a fused Triton kernel.

Origin: written for linearize. It implements :func:`linearize.kernels.hybrid.global_cache.global_decode_step` (the
definition and the PyTorch reference are that module's; the ring-buffer contract is ``decode.py``'s), with the same
in-place updates (ring buffers, global set, state) and the same output, fp32 arithmetic throughout.

Launch geometry: one launch, one program per (batch, key head), grid ``(B * Hk,)``. A program owns everything its
key head touches in the step, so no program reads another's write:

* the window (``W`` ring slots), the sinks and the ``K`` members of its key head, loaded once for all its query heads;
* its ``Hs / Hk`` state heads, one after another: the whole ``S [F, D]`` tile (all of D in one block) and ``z``,
  first read by the output of the ``H / Hs`` query heads of that state head and by the recall error of the key
  leaving the window, then the leaving key folded in and the tile stored;
* the recall error summed over those state heads (``e_j`` of ``global_cache.py``), which decides whether the leaving
  key replaces the weakest member; the new key's ring slots.

Order inside a program, as in the reference: the output reads the state and the global set before the step changes
them; the leaving key (``i - W + 1``, slot ``(i + 1) % W``, the new key itself when ``W == 1``) is scored against
the state before its own fold. The new key enters the window from the inputs (rounded to the cache dtype, as the
reference reads it back from the cache); slot ``i % W`` is written only after the window is read. Exact terms are
relative to the window's max, as in the reference (no extra rescaling for the sinks or the members).

Costs, not measured: one program per key head carries ``(Hs / Hk) * F * D`` fp32 of state through registers, one
state head at a time (``num_warps`` grows with the tile); few programs at small ``B * Hk``. No host syncs: CUDA
graph capturable (the output buffer comes from the caching allocator, shape-dependent only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.hybrid.decode_torch import _check_decode, _squeeze_t, sink_arguments
from linearize.kernels.hybrid.naive import NO_SINK, Sinks, State


@triton.jit
def _global_decode_kernel(
    Q, K, V, FQ, FK, G, KC, VC, FKC, S, Z, POS, KS, VS, SPOS, GK, GV, GFK, GPOS, GSCORE, O,
    scale, eps,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr, E: tl.constexpr, NK: tl.constexpr,
    LINEAR: tl.constexpr, NO_POS: tl.constexpr,
    BW: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HK
    hk = pid % HK
    bhk = pid.to(tl.int64)
    offs_w = tl.arange(0, BW)
    offs_dk = tl.arange(0, BDK)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    offs_k = tl.arange(0, BK)
    mdk = offs_dk < DK
    md = offs_d < DV
    mf = offs_f < F
    mk = offs_k < NK
    i = tl.load(POS + b).to(tl.int64)

    # the window: slot r holds key j_r = i - ((i - r) mod W); the new key's slot is read from the inputs
    slot_new = i % W
    j_r = i - ((i - offs_w + W) % W)
    ok = (offs_w < W) & (j_r >= 0)
    is_new = offs_w == slot_new
    k_new = tl.load(K + bhk * DK + offs_dk, mask=mdk, other=0.0).to(KC.dtype.element_ty).to(tl.float32)
    v_new = tl.load(V + bhk * DV + offs_d, mask=md, other=0.0).to(VC.dtype.element_ty).to(tl.float32)
    kw = tl.load(KC + bhk * W * DK + offs_w[:, None] * DK + offs_dk[None, :],
                 mask=(ok & ~is_new)[:, None] & mdk[None, :], other=0.0).to(tl.float32)
    kw = tl.where(is_new[:, None], k_new[None, :], kw)
    vw = tl.load(VC + bhk * W * DV + offs_w[:, None] * DV + offs_d[None, :],
                 mask=(ok & ~is_new)[:, None] & md[None, :], other=0.0).to(tl.float32)
    vw = tl.where(is_new[:, None], v_new[None, :], vw)

    # the key leaving the window for the next query: j_old = i - W + 1, if it exists and is no sink
    j_old = i - W + 1
    slot_old = (i + 1) % W
    live = j_old >= 0
    if E > 0:  # sink keys seen by this query (position <= i - W); empty sink slots hold NO_SINK
        offs_e = tl.arange(0, BE)
        me = offs_e < E
        sp = tl.load(SPOS + b * E + offs_e, mask=me, other=NO_POS)
        seen = me & (sp <= i - W)
        ks = tl.load(KS + bhk * E * DK + offs_e[:, None] * DK + offs_dk[None, :], mask=seen[:, None] & mdk[None, :],
                     other=0.0).to(tl.float32)
        vs = tl.load(VS + bhk * E * DV + offs_e[:, None] * DV + offs_d[None, :], mask=seen[:, None] & md[None, :],
                     other=0.0).to(tl.float32)
        live = live & (tl.sum((me & (sp == j_old)).to(tl.int32), 0) == 0)
    if W == 1:  # the leaving key is the new one
        k_old = k_new
        v_old = v_new
    else:  # slot (i + 1) % W != i % W: not written in this step
        # (a vector mask & a scalar is refused by the interpreter: masks cut at a scalar-chosen length instead)
        k_old = tl.load(KC + bhk * W * DK + slot_old * DK + offs_dk, mask=offs_dk < tl.where(live, DK, 0),
                        other=0.0).to(tl.float32)
        v_old = tl.load(VC + bhk * W * DV + slot_old * DV + offs_d, mask=offs_d < tl.where(live, DV, 0),
                        other=0.0).to(tl.float32)

    # the global set before the step: filled slots have a finite score
    gpos = tl.load(GPOS + bhk * NK + offs_k, mask=mk, other=NO_POS).to(tl.int64)
    gscore = tl.load(GSCORE + bhk * NK + offs_k, mask=mk, other=float("-inf")).to(tl.float32)
    filled = mk & (gscore > float("-inf")) & (gscore < float("inf"))
    gk = tl.load(GK + bhk * NK * DK + offs_k[:, None] * DK + offs_dk[None, :], mask=filled[:, None] & mdk[None, :],
                 other=0.0).to(tl.float32)
    gv = tl.load(GV + bhk * NK * DV + offs_k[:, None] * DV + offs_d[None, :], mask=filled[:, None] & md[None, :],
                 other=0.0).to(tl.float32)

    err = 0.0
    for r in range(HS // HK):  # the state heads of this key head
        hs = hk * (HS // HK) + r
        bhs = (b * HS + hs).to(tl.int64)
        st_ptr = S + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :]
        st_mask = mf[:, None] & md[None, :]
        s_state = tl.load(st_ptr, mask=st_mask, other=0.0)
        z = tl.load(Z + bhs * F + offs_f, mask=mf, other=0.0)
        gfk = tl.load(GFK + bhs * NK * F + offs_k[:, None] * F + offs_f[None, :], mask=filled[:, None] & mf[None, :],
                      other=0.0).to(tl.float32)

        # output of the query heads of this state head: window, sinks, members, state minus the members' terms
        for t in range(H // HS):
            h = hs * (H // HS) + t
            bh = (b * H + h).to(tl.int64)
            q = tl.load(Q + bh * DK + offs_dk, mask=mdk, other=0.0).to(tl.float32)
            fq = tl.load(FQ + bh * F + offs_f, mask=mf, other=0.0).to(tl.float32)
            g = tl.load(G + h).to(tl.float32)
            sc = tl.where(ok, tl.sum(q[None, :] * kw, 1) * scale, float("-inf"))
            c = tl.max(sc, 0)  # finite: the new key is in the window
            p = tl.exp(sc - c) * g
            num = tl.sum(p[:, None] * vw, 0)
            den = tl.sum(p, 0)
            if E > 0:
                ps = tl.where(seen, tl.exp(tl.sum(q[None, :] * ks, 1) * scale - c), 0.0) * g
                num += tl.sum(ps[:, None] * vs, 0)
                den += tl.sum(ps, 0)
            wg = tl.where(filled, tl.exp(tl.sum(q[None, :] * gk, 1) * scale - c), 0.0) * g
            if LINEAR:
                wg -= tl.where(filled, tl.sum(fq[None, :] * gfk, 1), 0.0)
            num += tl.sum(wg[:, None] * gv, 0)
            den += tl.sum(wg, 0)
            if LINEAR:
                num += tl.sum(fq[:, None] * s_state, 0)
                den += tl.sum(fq * z, 0)
            tl.store(O + bh * DV + offs_d, (num / (den + eps)).to(O.dtype.element_ty), mask=md)

        # recall error of the leaving key against the state before its fold, then the fold
        fk_new = tl.load(FK + bhs * F + offs_f, mask=mf, other=0.0).to(FKC.dtype.element_ty).to(tl.float32)
        if W == 1:
            f_old = tl.where(live, fk_new, 0.0)
        else:
            f_old = tl.load(FKC + bhs * W * F + slot_old * F + offs_f, mask=offs_f < tl.where(live, F, 0),
                            other=0.0).to(tl.float32)
        rec = tl.sum(f_old[:, None] * s_state, 0) / (tl.sum(f_old * z, 0) + eps)
        err += tl.sum(tl.where(md, (v_old - rec) * (v_old - rec), 0.0), 0)
        tl.store(st_ptr, s_state + f_old[:, None] * v_old[None, :], mask=st_mask)
        tl.store(Z + bhs * F + offs_f, z + f_old, mask=mf)
        tl.store(FKC + bhs * W * F + slot_new * F + offs_f, fk_new.to(FKC.dtype.element_ty), mask=mf)

    tl.store(KC + bhk * W * DK + slot_new * DK + offs_dk, k_new.to(KC.dtype.element_ty), mask=mdk)
    tl.store(VC + bhk * W * DV + slot_new * DV + offs_d, v_new.to(VC.dtype.element_ty), mask=md)

    # the weakest member (lowest score, the earlier key on ties; the first slot among empty ones) and whether the
    # leaving key beats it (higher score, or equal score and later position)
    low = tl.min(tl.where(mk, gscore, float("inf")), 0)
    key = tl.where(mk & (gscore == low), gpos, NO_POS + 1)
    kmin = tl.min(key, 0)
    weakest = tl.min(tl.where(key == kmin, offs_k, BK), 0)
    at = offs_k == weakest
    w_score = tl.min(tl.where(at, gscore, float("inf")), 0)
    w_pos = tl.min(tl.where(at, gpos, NO_POS + 1), 0)
    enter = live & ((err > w_score) | ((err == w_score) & (j_old > w_pos)))
    tl.debug_barrier()  # every read of the old set is done before a slot is overwritten
    hit = enter & (weakest < NK)
    target = offs_k == tl.where(hit, weakest, BK)  # the replaced slot, or none
    tl.store(GK + bhk * NK * DK + weakest * DK + offs_dk, k_old.to(GK.dtype.element_ty),
             mask=offs_dk < tl.where(hit, DK, 0))
    tl.store(GV + bhk * NK * DV + weakest * DV + offs_d, v_old.to(GV.dtype.element_ty),
             mask=offs_d < tl.where(hit, DV, 0))
    tl.store(GPOS + bhk * NK + offs_k, tl.where(target, j_old, gpos).to(GPOS.dtype.element_ty), mask=target)
    tl.store(GSCORE + bhk * NK + offs_k, tl.where(target, err, gscore), mask=target)
    for r in range(HS // HK):  # phi(k) of the new member, per state head
        bhs = (b * HS + hk * (HS // HK) + r).to(tl.int64)
        if W == 1:
            f_old = tl.load(FK + bhs * F + offs_f, mask=mf, other=0.0).to(FKC.dtype.element_ty).to(tl.float32)
        else:
            f_old = tl.load(FKC + bhs * W * F + slot_old * F + offs_f, mask=mf, other=0.0).to(tl.float32)
        tl.store(GFK + bhs * NK * F + weakest * F + offs_f, f_old.to(GFK.dtype.element_ty),
                 mask=offs_f < tl.where(hit, F, 0))


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def global_decode_step_triton(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, *,
                              state: State, k_cache: Tensor, v_cache: Tensor, fk_cache: Tensor, pos: Tensor,
                              window: int, scale: float, global_set, eps: float = 1e-6, sinks: Sinks | None = None,
                              linear: bool = True) -> Tensor:
    """The Triton twin of ``global_cache.global_decode_step`` (same arguments, same in-place contract): one launch,
    one program per (batch, key head). ``state``, the caches and the five global-set tensors must be contiguous
    (they are updated in place). Returns o [B, H, 1, D] in ``v.dtype``."""
    q, k, v, fq, fk = (_squeeze_t(x) for x in (q, k, v, fq, fk))
    if window < 1:
        raise ValueError(f"a global cache needs window >= 1, got {window}")
    B, H, Hk, Hs, F, D = _check_decode(q, k, v, fq, fk, gamma, state, k_cache, v_cache, fk_cache, pos, window)
    S, z = state
    gk, gv, gfk, gpos, gscore = global_set
    NK, DK = gscore.shape[-1], q.shape[-1]
    want = {"k": (B, Hk, NK, DK), "v": (B, Hk, NK, D), "fk": (B, Hs, NK, F), "pos": (B, Hk, NK), "score": (B, Hk, NK)}
    for name, x in zip(want, global_set):
        if tuple(x.shape) != want[name] or not x.is_contiguous():
            raise ValueError(f"global set {name} must be contiguous of shape {want[name]}, got {tuple(x.shape)}")
    if gscore.dtype != torch.float32 or gpos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"global set scores must be fp32 and positions integers, got {gscore.dtype}, {gpos.dtype}")
    ks, vs, spos, E = sink_arguments(sinks, B, Hk, DK, D, S, pos_dtype=torch.int64)
    out = torch.empty(B, H, 1, D, device=v.device, dtype=v.dtype)
    BF, BD = _p2(F), _p2(D)
    _global_decode_kernel[(B * Hk,)](
        q, k, v, fq, fk, gamma.contiguous(), k_cache, v_cache, fk_cache, S, z, pos.contiguous(), ks, vs, spos,
        gk, gv, gfk, gpos, gscore, out,
        float(scale), float(eps),
        H=H, HK=Hk, HS=Hs, DK=DK, DV=D, F=F, W=window, E=E, NK=NK, LINEAR=bool(linear), NO_POS=NO_SINK,
        BW=_p2(window), BDK=_p2(DK), BD=BD, BF=BF, BE=_p2(E), BK=_p2(NK), num_warps=4 if BF * BD <= 4096 else 8,
    )
    return out


__all__ = ["global_decode_step_triton"]
