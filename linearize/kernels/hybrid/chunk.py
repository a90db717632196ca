"""Fused Triton kernels for chunked causal hybrid (sliding-window softmax + linear) attention, forward and backward.

Origin: written for linearize from the definition in ``naive.py`` (no code taken from other projects). The math is
the chunked form of ``hybrid_attention_chunked``: the linear part is causal linear attention over the *shifted* key
sequence (slot ``t`` holds key ``P + t - W``, the key that leaves the window at query ``t``), the window part is an
online softmax over at most ``W + BT - 1`` keys per query chunk, and both share one normaliser.

Design trade-off ("fused chunk"): one program per (D block, batch, query head) walks the chunks of its sequence in
order and keeps the fp32 state ``S[F, BD]``, ``z[F]`` on-chip. No chunk state ever goes to HBM (fla's ``chunk``
stores every chunk state), so the forward reads each input once and writes the output once, at the price of
parallelism over only ``B * H * ceil(D / BD)`` programs. The window part is recomputed by each D block (it is linear
in ``v``, so D blocks just own their columns). Under GQA a state head is recomputed by each of its query heads;
gradients into shared heads are summed in PyTorch afterwards.

Backward (recomputation, no saved chunk states):
  * ``_win_dq_kernel``   parallel over query blocks: window part of dq and ``R_t = sum_j w_tj (dnum_t.v_j + dden_t)``
  * ``_win_dkv_kernel``  parallel over key blocks: window part of dk, dv
  * ``_lin_dq_kernel``   forward in time, state on-chip: d fq
  * ``_lin_dkv_kernel``  backward in time, dS on-chip: d fk, linear part of dv, d initial_state
The gradient through ``c_t`` (the window max, which does *not* cancel because the linear part shares the
normaliser) goes to the argmax key saved by the forward; it is added in PyTorch.

Layout (contiguous, as naive.py): q [B, H, T, d], k [B, Hk, Tk, d], v [B, Hk, Tk, D], fq [B, H, T, F],
fk [B, Hs, Tk, F], gamma [H], state S [B, Hs, F, D] / z [B, Hs, F] in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.hybrid.naive import State, _check_shapes, _fold

# --------------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, FQ, FK, G, S0, Z0,  # inputs
    O, SE, ZE, DEN, CMAX, CARG,  # outputs
    scale, eps, T, Tk, P, n0,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    STORE_STATE: tl.constexpr, PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    hs = h // (H // HS)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    bhs = (b * HS + hs).to(tl.int64)

    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_dk = tl.arange(0, BDK)
    mf = offs_f < F
    md = offs_d < DV
    mdk = offs_dk < DK
    causal = offs_t[:, None] >= offs_t[None, :]

    S = tl.load(S0 + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
    z = tl.load(Z0 + bhs * F + offs_f, mask=mf, other=0.0)
    if W > 0:
        g = tl.load(G + h).to(tl.float32)

    for t0 in range(0, T, BT):
        t = t0 + offs_t
        mt = t < T
        fq = tl.load(FQ + bh * T * F + t[:, None] * F + offs_f[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
        # linear part over the shifted key sequence: slot t holds key u = P + t - W
        u = P + t - W
        mu = mt & (u >= n0)
        fkl = tl.load(FK + bhs * Tk * F + u[:, None] * F + offs_f[None, :], mask=mu[:, None] & mf[None, :], other=0.0)
        vl = tl.load(V + bhk * Tk * DV + u[:, None] * DV + offs_d[None, :], mask=mu[:, None] & md[None, :], other=0.0)
        a = tl.dot(fq, tl.trans(fkl), input_precision=PREC)
        a = tl.where(causal, a, 0.0)
        num = tl.dot(a.to(vl.dtype), vl, input_precision=PREC)
        num += tl.dot(fq, S.to(fq.dtype), input_precision=PREC)
        den = tl.sum(a, 1) + tl.sum(fq.to(tl.float32) * z[None, :], 1)
        S += tl.dot(tl.trans(fkl), vl, input_precision=PREC)
        z += tl.sum(fkl.to(tl.float32), 0)

        if W > 0:
            i = P + t  # absolute key index of each query
            q = tl.load(Q + bh * T * DK + t[:, None] * DK + offs_dk[None, :], mask=mt[:, None] & mdk[None, :], other=0.0)
            m_i = tl.full([BT], float("-inf"), tl.float32)
            l_i = tl.zeros([BT], tl.float32)
            arg = tl.zeros([BT], tl.int32)
            acc = tl.zeros([BT, BD], tl.float32)
            for j0 in range(P + t0 - W + 1, P + t0 + BT, BT):
                j = j0 + offs_t
                mj = (j >= 0) & (j < Tk)
                kk = tl.load(K + bhk * Tk * DK + j[:, None] * DK + offs_dk[None, :], mask=mj[:, None] & mdk[None, :], other=0.0)
                s = tl.dot(q, tl.trans(kk), input_precision=PREC) * scale
                ok = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - W) & mj[None, :] & mt[:, None]
                s = tl.where(ok, s, float("-inf"))
                bm = tl.max(s, 1)
                bidx = tl.min(tl.where(s == bm[:, None], j[None, :], 2147483647), 1)
                arg = tl.where(bm > m_i, bidx, arg)
                m_new = tl.maximum(m_i, bm)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                vv = tl.load(V + bhk * Tk * DV + j[:, None] * DV + offs_d[None, :], mask=mj[:, None] & md[None, :], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
                m_i = m_new
            num += g * acc
            den += g * l_i
            if pid_d == 0:
                c = tl.where(m_i == float("-inf"), 0.0, m_i)
                tl.store(CMAX + bh * T + t, c, mask=mt)
                tl.store(CARG + bh * T + t, arg, mask=mt)

        den = den + eps
        o = num / den[:, None]
        tl.store(O + bh * T * DV + t[:, None] * DV + offs_d[None, :], o.to(O.dtype.element_ty), mask=mt[:, None] & md[None, :])
        if pid_d == 0:
            tl.store(DEN + bh * T + t, den, mask=mt)

    if STORE_STATE:
        if h % (H // HS) == 0:  # one writer per state head
            tl.store(SE + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :], S, mask=mf[:, None] & md[None, :])
            if pid_d == 0:
                tl.store(ZE + bhs * F + offs_f, z, mask=mf)


@triton.jit
def _win_dq_kernel(
    Q, K, V, G, DO, DEN, DELTA, CMAX,
    DQ, R,
    scale, T, Tk, P,
    H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    mdk = offs_dk < DK
    mdv = offs_dv < DV
    t0 = pid_t * BT
    t = t0 + offs_t
    mt = t < T
    i = P + t
    g = tl.load(G + h).to(tl.float32)

    q = tl.load(Q + bh * T * DK + t[:, None] * DK + offs_dk[None, :], mask=mt[:, None] & mdk[None, :], other=0.0)
    do = tl.load(DO + bh * T * DV + t[:, None] * DV + offs_dv[None, :], mask=mt[:, None] & mdv[None, :], other=0.0)
    den = tl.load(DEN + bh * T + t, mask=mt, other=1.0)
    delta = tl.load(DELTA + bh * T + t, mask=mt, other=0.0)
    c = tl.load(CMAX + bh * T + t, mask=mt, other=0.0)
    dnum = (do.to(tl.float32) / den[:, None]).to(q.dtype)
    dden = -delta / den

    acc = tl.zeros([BT, BDK], tl.float32)
    r = tl.zeros([BT], tl.float32)
    for j0 in range(P + t0 - W + 1, P + t0 + BT, BT):
        j = j0 + offs_t
        mj = (j >= 0) & (j < Tk)
        kk = tl.load(K + bhk * Tk * DK + j[:, None] * DK + offs_dk[None, :], mask=mj[:, None] & mdk[None, :], other=0.0)
        vv = tl.load(V + bhk * Tk * DV + j[:, None] * DV + offs_dv[None, :], mask=mj[:, None] & mdv[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kk), input_precision=PREC) * scale
        ok = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - W) & mj[None, :] & mt[:, None]
        w = tl.where(ok, tl.exp(s - c[:, None]), 0.0)
        dp = tl.dot(dnum, tl.trans(vv), input_precision=PREC) + dden[:, None]
        wdp = w * dp
        r += tl.sum(wdp, 1)
        acc += tl.dot((g * wdp).to(kk.dtype), kk, input_precision=PREC)
    tl.store(DQ + bh * T * DK + t[:, None] * DK + offs_dk[None, :], acc * scale, mask=mt[:, None] & mdk[None, :])
    tl.store(R + bh * T + t, r, mask=mt)


@triton.jit
def _win_dkv_kernel(
    Q, K, V, G, DO, DEN, DELTA, CMAX,
    DK_, DV_,
    scale, T, Tk, P,
    H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    mdk = offs_dk < DK
    mdv = offs_dv < DV
    j0 = pid_j * BT
    j = j0 + offs_t
    mj = j < Tk
    g = tl.load(G + h).to(tl.float32)

    kk = tl.load(K + bhk * Tk * DK + j[:, None] * DK + offs_dk[None, :], mask=mj[:, None] & mdk[None, :], other=0.0)
    vv = tl.load(V + bhk * Tk * DV + j[:, None] * DV + offs_dv[None, :], mask=mj[:, None] & mdv[None, :], other=0.0)
    acc_k = tl.zeros([BT, BDK], tl.float32)
    acc_v = tl.zeros([BT, BDV], tl.float32)
    # key j is in the window of queries i in [j, j + W - 1], i.e. query rows t = i - P
    for t0 in range(j0 - P, j0 - P + BT + W - 1, BT):
        t = t0 + offs_t
        mt = (t >= 0) & (t < T)
        i = P + t
        q = tl.load(Q + bh * T * DK + t[:, None] * DK + offs_dk[None, :], mask=mt[:, None] & mdk[None, :], other=0.0)
        do = tl.load(DO + bh * T * DV + t[:, None] * DV + offs_dv[None, :], mask=mt[:, None] & mdv[None, :], other=0.0)
        den = tl.load(DEN + bh * T + t, mask=mt, other=1.0)
        delta = tl.load(DELTA + bh * T + t, mask=mt, other=0.0)
        c = tl.load(CMAX + bh * T + t, mask=mt, other=0.0)
        dnum = (do.to(tl.float32) / den[:, None]).to(q.dtype)
        dden = -delta / den
        st = tl.dot(kk, tl.trans(q), input_precision=PREC) * scale  # [keys, queries]
        ok = (j[:, None] <= i[None, :]) & (j[:, None] > i[None, :] - W) & mj[:, None] & mt[None, :]
        wt = tl.where(ok, tl.exp(st - c[None, :]), 0.0) * g
        dpt = tl.dot(vv, tl.trans(dnum), input_precision=PREC) + dden[None, :]
        acc_k += tl.dot((wt * dpt).to(q.dtype), q, input_precision=PREC)
        acc_v += tl.dot(wt.to(dnum.dtype), dnum, input_precision=PREC)
    tl.store(DK_ + bh * Tk * DK + j[:, None] * DK + offs_dk[None, :], acc_k * scale, mask=mj[:, None] & mdk[None, :])
    tl.store(DV_ + bh * Tk * DV + j[:, None] * DV + offs_dv[None, :], acc_v, mask=mj[:, None] & mdv[None, :])


@triton.jit
def _lin_dq_kernel(
    FQ, FK, V, S0, Z0, DO, DEN, DELTA,
    DFQ,
    T, Tk, P, n0,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    hs = h // (H // HS)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    bhs = (b * HS + hs).to(tl.int64)
    B = tl.num_programs(1) // H
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    causal = offs_t[:, None] >= offs_t[None, :]
    first = (pid_d == 0).to(tl.float32)  # the normaliser terms are counted by D block 0 only

    S = tl.load(S0 + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
    z = tl.load(Z0 + bhs * F + offs_f, mask=mf, other=0.0)
    out = DFQ + (pid_d * B * H).to(tl.int64) * T * F + bh * T * F
    for t0 in range(0, T, BT):
        t = t0 + offs_t
        mt = t < T
        u = P + t - W
        mu = mt & (u >= n0)
        fq = tl.load(FQ + bh * T * F + t[:, None] * F + offs_f[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
        fkl = tl.load(FK + bhs * Tk * F + u[:, None] * F + offs_f[None, :], mask=mu[:, None] & mf[None, :], other=0.0)
        vl = tl.load(V + bhk * Tk * DV + u[:, None] * DV + offs_d[None, :], mask=mu[:, None] & md[None, :], other=0.0)
        do = tl.load(DO + bh * T * DV + t[:, None] * DV + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        den = tl.load(DEN + bh * T + t, mask=mt, other=1.0)
        delta = tl.load(DELTA + bh * T + t, mask=mt, other=0.0)
        dnum = (do.to(tl.float32) / den[:, None]).to(fq.dtype)
        dden = -delta / den * first
        da = tl.dot(dnum, tl.trans(vl), input_precision=PREC) + dden[:, None]
        da = tl.where(causal, da, 0.0)
        dfq = tl.dot(da.to(fkl.dtype), fkl, input_precision=PREC)
        dfq += tl.dot(dnum, tl.trans(S.to(dnum.dtype)), input_precision=PREC)
        dfq += dden[:, None] * z[None, :]
        tl.store(out + t[:, None] * F + offs_f[None, :], dfq, mask=mt[:, None] & mf[None, :])
        S += tl.dot(tl.trans(fkl), vl, input_precision=PREC)
        z += tl.sum(fkl.to(tl.float32), 0)


@triton.jit
def _lin_dkv_kernel(
    FQ, FK, V, DO, DEN, DELTA, DSF, DZF,
    DFK, DVL, DS0, DZ0,
    T, Tk, P, n0,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, HAS_DSF: tl.constexpr, PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    hs = h // (H // HS)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    bhs = (b * HS + hs).to(tl.int64)
    B = tl.num_programs(1) // H
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    causal_t = offs_t[:, None] <= offs_t[None, :]  # [slot s, query t]: s <= t
    first = (pid_d == 0).to(tl.float32)

    dS = tl.zeros([BF, BD], tl.float32)
    dz = tl.zeros([BF], tl.float32)
    if HAS_DSF:
        if h % (H // HS) == 0:  # the final-state gradient is counted once per state head
            dS += tl.load(DSF + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
            dz += tl.load(DZF + bhs * F + offs_f, mask=mf, other=0.0) * first
    out_fk = DFK + (pid_d * B * H).to(tl.int64) * Tk * F + bh * Tk * F
    NT = tl.cdiv(T, BT)
    for it in range(0, NT):
        t0 = (NT - 1 - it) * BT
        t = t0 + offs_t
        mt = t < T
        u = P + t - W
        mu = mt & (u >= n0)
        fq = tl.load(FQ + bh * T * F + t[:, None] * F + offs_f[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
        fkl = tl.load(FK + bhs * Tk * F + u[:, None] * F + offs_f[None, :], mask=mu[:, None] & mf[None, :], other=0.0)
        vl = tl.load(V + bhk * Tk * DV + u[:, None] * DV + offs_d[None, :], mask=mu[:, None] & md[None, :], other=0.0)
        do = tl.load(DO + bh * T * DV + t[:, None] * DV + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        den = tl.load(DEN + bh * T + t, mask=mt, other=1.0)
        delta = tl.load(DELTA + bh * T + t, mask=mt, other=0.0)
        dnum = (do.to(tl.float32) / den[:, None]).to(fq.dtype)
        dden = -delta / den * first

        at = tl.dot(fkl, tl.trans(fq), input_precision=PREC)  # [s, t]
        at = tl.where(causal_t, at, 0.0)
        dvl = tl.dot(at.to(dnum.dtype), dnum, input_precision=PREC) + tl.dot(fkl, dS.to(fkl.dtype), input_precision=PREC)
        dat = tl.dot(vl, tl.trans(dnum), input_precision=PREC) + dden[None, :]
        dat = tl.where(causal_t, dat, 0.0)
        dfk = tl.dot(dat.to(fq.dtype), fq, input_precision=PREC)
        dfk += tl.dot(vl, tl.trans(dS.to(vl.dtype)), input_precision=PREC)
        dfk += dz[None, :]
        tl.store(out_fk + u[:, None] * F + offs_f[None, :], dfk, mask=mu[:, None] & mf[None, :])
        tl.store(DVL + bh * Tk * DV + u[:, None] * DV + offs_d[None, :], dvl, mask=mu[:, None] & md[None, :])
        dS += tl.dot(tl.trans(fq), dnum, input_precision=PREC)
        dz += tl.sum(fq.to(tl.float32) * dden[:, None], 0)

    tl.store(DS0 + bh * F * DV + offs_f[:, None] * DV + offs_d[None, :], dS, mask=mf[:, None] & md[None, :])
    if pid_d == 0:
        tl.store(DZ0 + bh * F + offs_f, dz, mask=mf)


# --------------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _blocks(F: int, D: int, chunk_size: int | None, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(BT, BF, BD). The state tile BF x BD fp32 lives in registers: keep it <= 8K elements. fp32 inputs double
    the shared-memory tiles (F = D = 128 at BT = 64 needs 246 KB > 227 KB on H200), so they get half the chunk."""
    BF = _pow2(F)
    BD = min(_pow2(D), 64 if BF <= 128 else 32)
    BT = chunk_size or (64 if BF <= 128 else 32) // (2 if dtype == torch.float32 else 1)
    return BT, BF, BD


def _prec(x: Tensor) -> str:
    # fp32 inputs are the reference path: exact fp32 products (no tf32). bf16/fp16 ignore this.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def hybrid_fwd(q, k, v, fq, fk, gamma, S0, z0, *, window, scale, eps, n0, store_state, chunk_size=None):
    B, H, T, F = fq.shape
    _, HK, Tk, DV = v.shape
    HS = fk.shape[1]
    DK = q.shape[-1] if window > 0 else 16
    P = Tk - T
    BT, BF, BD = _blocks(F, DV, chunk_size, v.dtype)
    dev = v.device
    o = torch.empty(B, H, T, DV, device=dev, dtype=v.dtype)
    den = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    cmax = torch.empty(B, H, T, device=dev, dtype=torch.float32) if window > 0 else den
    carg = torch.empty(B, H, T, device=dev, dtype=torch.int32) if window > 0 else den
    SE = torch.empty(B, HS, F, DV, device=dev, dtype=torch.float32) if store_state else S0
    ZE = torch.empty(B, HS, F, device=dev, dtype=torch.float32) if store_state else z0
    qq, kk, gg = (q, k, gamma) if window > 0 else (fq, fk, den)
    grid = (triton.cdiv(DV, BD), B * H)
    _fwd_kernel[grid](
        qq, kk, v, fq, fk, gg, S0, z0, o, SE, ZE, den, cmax, carg,
        float(scale), float(eps), T, Tk, P, n0,
        H=H, HK=HK, HS=HS, DK=DK, DV=DV, F=F, W=window, BT=BT, BDK=_pow2(DK), BD=BD, BF=BF,
        STORE_STATE=store_state, PREC=_prec(v), num_warps=4 if BF * BD <= 4096 else 8,
    )
    return o, SE, ZE, den, cmax, carg


def hybrid_bwd(q, k, v, fq, fk, gamma, S0, z0, o, do, den, cmax, carg, dSf, dzf, *, window, scale, n0, chunk_size=None):
    B, H, T, F = fq.shape
    _, HK, Tk, DV = v.shape
    HS = fk.shape[1]
    P = Tk - T
    BT, BF, BD = _blocks(F, DV, chunk_size, v.dtype)
    NDB = triton.cdiv(DV, BD)
    dev = v.device
    f32 = torch.float32
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # do . o, [B, H, T]
    prec = _prec(v)
    warps = 4 if BF * BD <= 4096 else 8

    dfq_p = torch.empty(NDB, B, H, T, F, device=dev, dtype=f32)
    _lin_dq_kernel[(NDB, B * H)](
        fq, fk, v, S0, z0, do, den, delta, dfq_p, T, Tk, P, n0,
        H=H, HK=HK, HS=HS, DV=DV, F=F, W=window, BT=BT, BD=BD, BF=BF, PREC=prec, num_warps=warps,
    )
    dfk_p = torch.zeros(NDB, B, H, Tk, F, device=dev, dtype=f32)
    dv_h = torch.zeros(B, H, Tk, DV, device=dev, dtype=f32)
    dS0 = torch.empty(B, H, F, DV, device=dev, dtype=f32)
    dz0 = torch.empty(B, H, F, device=dev, dtype=f32)
    has_dsf = dSf is not None
    _lin_dkv_kernel[(NDB, B * H)](
        fq, fk, v, do, den, delta, dSf if has_dsf else dS0, dzf if has_dsf else dz0,
        dfk_p, dv_h, dS0, dz0, T, Tk, P, n0,
        H=H, HK=HK, HS=HS, DV=DV, F=F, W=window, BT=BT, BD=BD, BF=BF, HAS_DSF=has_dsf, PREC=prec, num_warps=warps,
    )
    dfq = dfq_p.sum(0) if NDB > 1 else dfq_p[0]
    dfk = (dfk_p.sum(0) if NDB > 1 else dfk_p[0]).view(B, HS, H // HS, Tk, F).sum(2)
    dS0 = dS0.view(B, HS, H // HS, F, DV).sum(2)
    dz0 = dz0.view(B, HS, H // HS, F).sum(2)

    dq = dk = dgamma = None
    if window > 0:
        DK = q.shape[-1]
        BTW = min(BT, 64)
        dq = torch.empty(B, H, T, DK, device=dev, dtype=f32)
        r = torch.empty(B, H, T, device=dev, dtype=f32)
        _win_dq_kernel[(triton.cdiv(T, BTW), B * H)](
            q, k, v, gamma, do, den, delta, cmax, dq, r, float(scale), T, Tk, P,
            H=H, HK=HK, DK=DK, DV=DV, W=window, BT=BTW, BDK=_pow2(DK), BDV=_pow2(DV), PREC=prec, num_warps=4,
        )
        dk_h = torch.empty(B, H, Tk, DK, device=dev, dtype=f32)
        dvw = torch.empty(B, H, Tk, DV, device=dev, dtype=f32)
        _win_dkv_kernel[(triton.cdiv(Tk, BTW), B * H)](
            q, k, v, gamma, do, den, delta, cmax, dk_h, dvw, float(scale), T, Tk, P,
            H=H, HK=HK, DK=DK, DV=DV, W=window, BT=BTW, BDK=_pow2(DK), BDV=_pow2(DV), PREC=prec, num_warps=4,
        )
        dv_h += dvw
        # gradient through c_t = max over the window: d c_t = -gamma * R_t, routed to the argmax key
        g = gamma.float()
        dgamma = r.sum((0, 2))
        dc = (-g[None, :, None] * r * scale)[..., None]  # [B, H, T, 1]
        idx = carg.long()[..., None]
        k_h = k.float()[:, :, None].expand(B, HK, H // HK, Tk, DK).reshape(B, H, Tk, DK)
        dq += dc * torch.gather(k_h, 2, idx.expand(B, H, T, DK))
        dk_h.scatter_add_(2, idx.expand(B, H, T, DK), dc * q.float())
        dk = dk_h.view(B, HK, H // HK, Tk, DK).sum(2)
    dv = dv_h.view(B, HK, H // HK, Tk, DV).sum(2)
    return dq, dk, dv, dfq, dfk, dgamma, dS0, dz0


# --------------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------------


def _contiguous(*xs):
    return [x.contiguous() if isinstance(x, Tensor) and not x.is_contiguous() else x for x in xs]


class HybridAttentionFunction(torch.autograd.Function):
    """(q, k, v, fq, fk, gamma, S0, z0) -> (o, S_end, z_end). ``S0``/``z0`` already hold the prefix keys
    ``[0, n0)``; ``S_end`` adds every slot of the shifted sequence (the last key, ``P + T - W``, is folded outside)."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, S0, z0, window, scale, eps, n0, store_state, chunk_size):
        q, k, v, fq, fk, gamma, S0, z0 = _contiguous(q, k, v, fq, fk, gamma, S0, z0)
        o, SE, ZE, den, cmax, carg = hybrid_fwd(
            q, k, v, fq, fk, gamma, S0, z0, window=window, scale=scale, eps=eps, n0=n0, store_state=store_state,
            chunk_size=chunk_size,
        )
        ctx.save_for_backward(q, k, v, fq, fk, gamma, S0, z0, o, den, cmax, carg)
        ctx.cfg = (window, scale, n0, chunk_size)
        if not store_state:
            return o, None, None
        return o, SE, ZE

    @staticmethod
    def backward(ctx, do, dSf, dzf):
        q, k, v, fq, fk, gamma, S0, z0, o, den, cmax, carg = ctx.saved_tensors
        window, scale, n0, chunk_size = ctx.cfg
        if dSf is not None or dzf is not None:
            dSf = torch.zeros_like(S0) if dSf is None else dSf.float().contiguous()
            dzf = torch.zeros_like(z0) if dzf is None else dzf.float().contiguous()
        dq, dk, dv, dfq, dfk, dgamma, dS0, dz0 = hybrid_bwd(
            q, k, v, fq, fk, gamma, S0, z0, o, do, den, cmax, carg, dSf, dzf,
            window=window, scale=scale, n0=n0, chunk_size=chunk_size,
        )
        cast = lambda g, x: None if g is None or x is None else g.to(x.dtype)  # noqa: E731
        return (
            cast(dq, q) if window > 0 else None, cast(dk, k) if window > 0 else None, cast(dv, v), cast(dfq, fq),
            cast(dfk, fk), cast(dgamma, gamma) if window > 0 else None, dS0, dz0,
            None, None, None, None, None, None,
        )


# --------------------------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------------------------


def hybrid_attention_triton(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor | None = None,
    *,
    window: int,
    scale: float,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    chunk_size: int | None = None,
) -> tuple[Tensor, State | None]:
    """Fused Triton chunked hybrid / linear attention; same semantics as ``naive.hybrid_attention_chunked``
    (without ``key_mask``).

    Args:
        q, k, v, fq, fk, gamma: see ``naive.py`` for layouts; ``q``, ``k``, ``gamma`` may be None when
            ``window == 0``. ``k``/``v``/``fk`` may be longer than the queries (``Tk = P + T``, a cached prefix).
        window: sliding-window size W (0 = pure linear attention). Any W >= 0 works (W > T too); the cost of the
            window part grows with W.
        scale: softmax scale of the window scores (float).
        initial_state: optional ``(S [B, Hs, F, D], z [B, Hs, F])`` fp32 linear state before ``k[:, :, 0]``.
        output_final_state: also return the state for the next query (keys ``<= Tk - W``).
        eps: normaliser epsilon.
        chunk_size: queries per chunk (power of two >= 16); default 64 (32 when F > 128).

    Returns:
        ``(o [B, H, T, D] in v.dtype, (S, z) or None)``. Differentiable w.r.t. every tensor input and the initial
        state.

    Raises:
        ValueError: on inconsistent shapes (same checks as the reference).
    """
    B, H, T, Hk, Tk, Hs = _check_shapes(q, k, v, fq, fk, gamma, window)
    F, D = fk.shape[-1], v.shape[-1]
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    P = Tk - T
    if initial_state is None:
        S0 = torch.zeros(B, Hs, F, D, device=v.device, dtype=torch.float32)
        z0 = torch.zeros(B, Hs, F, device=v.device, dtype=torch.float32)
    else:
        S0, z0 = initial_state[0].float(), initial_state[1].float()
    n0 = max(0, min(Tk, P - window + 1))
    if n0:  # prefix keys already linear for query 0 (prefill after a cache): fold them in PyTorch
        S_add, z_add = _fold(fk[:, :, :n0].float(), v[:, :, :n0].float(), Hs)
        S0, z0 = S0 + S_add, z0 + z_add
    if T == 0:
        o = v.new_zeros(B, H, 0, D)
        return o, ((S0, z0) if output_final_state else None)
    o, S, z = HybridAttentionFunction.apply(
        q, k, v, fq, fk, gamma, S0, z0, window, float(scale), float(eps), n0, output_final_state, chunk_size
    )
    if not output_final_state:
        return o, None
    u_last = P + T - window  # the key that becomes linear at the next query
    if n0 <= u_last < Tk:
        S_add, z_add = _fold(fk[:, :, u_last : u_last + 1].float(), v[:, :, u_last : u_last + 1].float(), Hs)
        S, z = S + S_add, z + z_add
    return o, (S, z)
