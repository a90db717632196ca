"""Fused Triton kernels for chunked causal hybrid (sliding-window softmax + linear) attention, forward and backward.

Origin: written for linearize from the definition in ``naive.py`` (no code taken from other projects). The math is
the chunked form of ``hybrid_attention_chunked``: the linear part is causal linear attention over the *shifted* key
sequence (slot ``t`` holds key ``P + t - W``, the key that leaves the window at query ``t``), the window part is an
online softmax over at most ``W + BT - 1`` keys per query chunk, and both share one normaliser.

Design ("chunk-parallel over superchunks"): a superchunk is NSUB consecutive chunks of BT queries. Pass 1
(``_state_kernel``) writes each superchunk's fp32 ``phi(K)^T V`` and key sum, pass 2 (``_scan_kernel``) turns them
into the state before every superchunk (the total is the final state), pass 3 (``_fwd_kernel``) runs one program per
(D block, superchunk, query head) that walks its NSUB chunks with the state on-chip. NSUB is the fewest chunks that
still leave ~2048 programs, so only one fp32 state per superchunk touches HBM. The window part is recomputed by each
D block (it is linear in ``v``). Under GQA a state head is read by each of its query heads; gradients into shared
heads are summed in PyTorch afterwards.

Backward (the forward's per-superchunk states are saved; everything else is recomputed):
  * ``_win_dq_kernel``   parallel over query blocks: window part of dq and ``R_t = sum_j w_tj (dnum_t.v_j + dden_t)``
  * ``_win_dkv_kernel``  parallel over key blocks: window part of dk, dv (added onto the linear dv)
  * ``_lin_dq_kernel``   per superchunk, forward in time from the saved state: d fq
  * ``_dstate_kernel`` + reverse ``_scan_kernel``: state gradient entering every superchunk; its total is d initial_state
  * ``_lin_dkv_kernel``  per superchunk, backward in time, dS on-chip: d fk, linear part of dv
The gradient through ``c_t`` (the window max, which does *not* cancel because the linear part shares the
normaliser) goes to the argmax key saved by the forward; it is added in PyTorch.

Layout (contiguous, as naive.py): q [B, H, T, d], k [B, Hk, Tk, d], v [B, Hk, Tk, D], fq [B, H, T, F],
fk [B, Hs, Tk, F], gamma [H], state S [B, Hs, F, D] / z [B, Hs, F] in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.hybrid.naive import Sinks, State, _check_shapes, _check_sinks, _fold
from linearize.kernels.hybrid.sinks import add_sinks

# --------------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _state_kernel(
    FK, V, DS, DZ,
    T, Tk, P, n0, NS,
    HK: tl.constexpr, HS: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, NSUB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 1: per superchunk (NSUB chunks of BT slots of the shifted key sequence) dS = phi(K)^T V, dz = sum phi(K)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    b = pid_b // HS
    hs = pid_b % HS
    hk = hs // (HS // HK)
    bhs = pid_b.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    acc = tl.zeros([BF, BD], tl.float32)
    zacc = tl.zeros([BF], tl.float32)
    t_beg = pid_s * (NSUB * BT)
    t_end = tl.minimum(T, t_beg + NSUB * BT)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + offs_t
        u = P + t - W
        mu = (t < T) & (u >= n0)
        fkl = tl.load(FK + bhs * Tk * F + u[:, None] * F + offs_f[None, :], mask=mu[:, None] & mf[None, :], other=0.0)
        vl = tl.load(V + bhk * Tk * DV + u[:, None] * DV + offs_d[None, :], mask=mu[:, None] & md[None, :], other=0.0)
        acc += tl.dot(tl.trans(fkl), vl, input_precision=PREC)
        zacc += tl.sum(fkl.to(tl.float32), 0)
    sc = bhs * NS + pid_s
    tl.store(DS + sc * F * DV + offs_f[:, None] * DV + offs_d[None, :], acc, mask=mf[:, None] & md[None, :])
    if pid_d == 0:
        tl.store(DZ + sc * F + offs_f, zacc, mask=mf)


@triton.jit
def _dstate_kernel(
    FQ, DO, DEN, DELTA, DS, DZ,
    T, NS,
    DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, NSUB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
):
    """Backward pass 1: per superchunk and query head d(state) contributions sum phi(q)^T dnum, sum phi(q) dden."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    acc = tl.zeros([BF, BD], tl.float32)
    zacc = tl.zeros([BF], tl.float32)
    t_beg = pid_s * (NSUB * BT)
    t_end = tl.minimum(T, t_beg + NSUB * BT)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + offs_t
        mt = t < T
        fq = tl.load(FQ + bh * T * F + t[:, None] * F + offs_f[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
        do = tl.load(DO + bh * T * DV + t[:, None] * DV + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        den = tl.load(DEN + bh * T + t, mask=mt, other=1.0)
        delta = tl.load(DELTA + bh * T + t, mask=mt, other=0.0)
        dnum = (do.to(tl.float32) / den[:, None]).to(fq.dtype)
        dden = -delta / den
        acc += tl.dot(tl.trans(fq), dnum, input_precision=PREC)
        zacc += tl.sum(fq.to(tl.float32) * dden[:, None], 0)
    sc = bh * NS + pid_s
    tl.store(DS + sc * F * DV + offs_f[:, None] * DV + offs_d[None, :], acc, mask=mf[:, None] & md[None, :])
    if pid_d == 0:
        tl.store(DZ + sc * F + offs_f, zacc, mask=mf)


@triton.jit
def _delta_kernel(DO, O, DELTA, N, D: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    """delta = rowwise do . o in fp32, read straight from the bf16 / fp16 / fp32 tensors (rows of D)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BDV)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    a = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(a * b, 1), mask=rows < N)


@triton.jit
def _scan_kernel(X, INIT, OUT, NS, L, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLK: tl.constexpr):
    """Pass 2: X [R, NS, L] -> exclusive prefix (suffix when REVERSE) sums in place, starting from INIT [R, L] (or
    zero); the total goes to OUT [R, L]. Four chunks are loaded per step so their latencies overlap."""
    pid_l = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    offs = pid_l * BLK + tl.arange(0, BLK)
    m = offs < L
    if HAS_INIT:
        acc = tl.load(INIT + r * L + offs, mask=m, other=0.0)
    else:
        acc = tl.zeros([BLK], tl.float32)
    base = X + r * NS * L + offs
    for c0 in range(0, NS, 4):
        if REVERSE:
            i0 = NS - 1 - c0
            i1 = i0 - 1
            i2 = i0 - 2
            i3 = i0 - 3
        else:
            i0 = c0
            i1 = c0 + 1
            i2 = c0 + 2
            i3 = c0 + 3
        cv = offs * 0 + c0  # chunk counter as a tensor (keeps the masks boolean tensors)
        m1 = m & (cv + 1 < NS)
        m2 = m & (cv + 2 < NS)
        m3 = m & (cv + 3 < NS)
        x0 = tl.load(base + i0.to(tl.int64) * L, mask=m, other=0.0)
        x1 = tl.load(base + i1.to(tl.int64) * L, mask=m1, other=0.0)
        x2 = tl.load(base + i2.to(tl.int64) * L, mask=m2, other=0.0)
        x3 = tl.load(base + i3.to(tl.int64) * L, mask=m3, other=0.0)
        tl.store(base + i0.to(tl.int64) * L, acc, mask=m)
        acc += x0
        tl.store(base + i1.to(tl.int64) * L, acc, mask=m1)
        acc += x1
        tl.store(base + i2.to(tl.int64) * L, acc, mask=m2)
        acc += x2
        tl.store(base + i3.to(tl.int64) * L, acc, mask=m3)
        acc += x3
    tl.store(OUT + r * L + offs, acc, mask=m)


@triton.jit
def _fwd_kernel(
    Q, K, V, FQ, FK, G, SP, ZP,  # inputs (SP/ZP: state before each superchunk, [B*HS, NS, F, DV] / [B*HS, NS, F])
    O, DEN, CMAX, CARG,  # outputs
    scale, eps, T, Tk, P, n0, NS,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, NSUB: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    hs = h // (H // HS)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    bhs = (b * HS + hs).to(tl.int64)
    sc = bhs * NS + pid_s

    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_dk = tl.arange(0, BDK)
    mf = offs_f < F
    md = offs_d < DV
    mdk = offs_dk < DK
    causal = offs_t[:, None] >= offs_t[None, :]

    S = tl.load(SP + sc * F * DV + offs_f[:, None] * DV + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
    z = tl.load(ZP + sc * F + offs_f, mask=mf, other=0.0)
    if W > 0:
        g = tl.load(G + h).to(tl.float32)

    t_beg = pid_s * (NSUB * BT)
    t_end = tl.minimum(T, t_beg + NSUB * BT)
    for t0 in range(t_beg, t_end, BT):
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


@triton.jit
def _win_dq_kernel(
    Q, K, V, G, DO, DEN, DELTA, CMAX,
    DQ, R,
    scale, T, Tk, P,
    H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr, NEED_DQ: tl.constexpr,
):
    """The window part of dq and the row sums R_t (d gamma, the max's gradient); NEED_DQ False: R only."""
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
    # dnum stays fp32 (tf32 dot for bf16 inputs): R_t = sum_j w_tj (dnum . v_j + dden) cancels almost exactly
    # (dgamma = sum R_t), and rounding dnum to bf16 here was half of dgamma's bf16 error.
    dnum = do.to(tl.float32) / den[:, None]
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
        dp = tl.dot(dnum, tl.trans(vv.to(tl.float32)), input_precision=PREC) + dden[:, None]
        wdp = w * dp
        r += tl.sum(wdp, 1)
        if NEED_DQ:
            acc += tl.dot((g * wdp).to(kk.dtype), kk, input_precision=PREC)
    if NEED_DQ:
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
    dv_ptr = DV_ + bh * Tk * DV + j[:, None] * DV + offs_dv[None, :]  # accumulates onto the linear part
    acc_v += tl.load(dv_ptr, mask=mj[:, None] & mdv[None, :], other=0.0)
    tl.store(dv_ptr, acc_v, mask=mj[:, None] & mdv[None, :])


@triton.jit
def _lin_dq_kernel(
    FQ, FK, V, SP, ZP, DO, DEN, DELTA,
    DFQ,
    T, Tk, P, n0, NS,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, NSUB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    hs = h // (H // HS)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    bhs = (b * HS + hs).to(tl.int64)
    sc = bhs * NS + pid_s
    BHn = tl.num_programs(2)
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    causal = offs_t[:, None] >= offs_t[None, :]
    first = (pid_d == 0).to(tl.float32)  # the normaliser terms are counted by D block 0 only

    S = tl.load(SP + sc * F * DV + offs_f[:, None] * DV + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
    z = tl.load(ZP + sc * F + offs_f, mask=mf, other=0.0)
    out = DFQ + (pid_d * BHn).to(tl.int64) * T * F + bh * T * F
    t_beg = pid_s * (NSUB * BT)
    t_end = tl.minimum(T, t_beg + NSUB * BT)
    for t0 in range(t_beg, t_end, BT):
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
    FQ, FK, V, DO, DEN, DELTA, DSP, DZP,
    DFK, DVL,
    T, Tk, P, n0, NS,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, NSUB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
    NEED_DV: tl.constexpr,
):
    """Backward in time inside one superchunk; DSP/DZP [B*H, NS, F, DV] / [B*H, NS, F] hold the state gradient
    flowing in from every later superchunk (and the final state), per query head. NEED_DV False: d phi(k) only."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    hs = h // (H // HS)
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    bhs = (b * HS + hs).to(tl.int64)
    sc = bh * NS + pid_s
    BHn = tl.num_programs(2)
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    causal_t = offs_t[:, None] <= offs_t[None, :]  # [slot s, query t]: s <= t
    first = (pid_d == 0).to(tl.float32)

    dS = tl.load(DSP + sc * F * DV + offs_f[:, None] * DV + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
    dz = tl.load(DZP + sc * F + offs_f, mask=mf, other=0.0) * first
    out_fk = DFK + (pid_d * BHn).to(tl.int64) * Tk * F + bh * Tk * F
    t_beg = pid_s * (NSUB * BT)
    NT = tl.cdiv(tl.minimum(T, t_beg + NSUB * BT) - t_beg, BT)
    for it in range(0, NT):
        t0 = t_beg + (NT - 1 - it) * BT
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

        if NEED_DV:
            at = tl.dot(fkl, tl.trans(fq), input_precision=PREC)  # [s, t]
            at = tl.where(causal_t, at, 0.0)
            dvl = tl.dot(at.to(dnum.dtype), dnum, input_precision=PREC)
            dvl += tl.dot(fkl, dS.to(fkl.dtype), input_precision=PREC)
            tl.store(DVL + bh * Tk * DV + u[:, None] * DV + offs_d[None, :], dvl, mask=mu[:, None] & md[None, :])
        dat = tl.dot(vl, tl.trans(dnum), input_precision=PREC) + dden[None, :]
        dat = tl.where(causal_t, dat, 0.0)
        dfk = tl.dot(dat.to(fq.dtype), fq, input_precision=PREC)
        dfk += tl.dot(vl, tl.trans(dS.to(vl.dtype)), input_precision=PREC)
        dfk += dz[None, :]
        tl.store(out_fk + u[:, None] * F + offs_f[None, :], dfk, mask=mu[:, None] & mf[None, :])
        dS += tl.dot(tl.trans(fq), dnum, input_precision=PREC)
        dz += tl.sum(fq.to(tl.float32) * dden[:, None], 0)


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


@dataclass(frozen=True)
class ForwardLaunch:
    """Launch options of the forward's pass 3 (``_fwd_kernel``). The defaults, 4 warps / 2 stages, measured best on
    H200 (sweep in benchmarks/gpu_kernel_sweep.py: 1.07 ms vs 1.43 ms for 8 warps at B=2, H=16, T=16k, D=F=128,
    W=64, parity-checked on the GPU; docs/kernels.md). Pass another one (``launch=``) to sweep; nothing global."""

    num_warps: int = 4
    num_stages: int = 2
    block_d: int | None = None
    """D columns per program; None = ``_blocks``' choice."""


DEFAULT_FORWARD_LAUNCH = ForwardLaunch()
_TARGET_PROGRAMS = 2048  # ~15 programs per SM on a 132-SM H200: enough to hide the load latency of the chunk loop
_MAX_NSUB = 16


def _nsub(T: int, BT: int, programs_per_superchunk: int, sub_chunks: int | None = None) -> int:
    """Chunks per superchunk (a power of two): the fewest (most parallel) that still leaves >= _TARGET_PROGRAMS
    programs; larger superchunks write fewer fp32 prefix states (F * D * 4 bytes each) to HBM."""
    if sub_chunks is not None:
        return max(1, int(sub_chunks))
    nc = triton.cdiv(T, BT)
    n = 1
    while n < _MAX_NSUB and n * 2 <= nc and triton.cdiv(nc, n * 2) * programs_per_superchunk >= _TARGET_PROGRAMS:
        n *= 2
    return n


def _scan(x: Tensor, init: Tensor | None, out: Tensor, reverse: bool) -> None:
    """x [R, NS, L] -> exclusive prefix (or suffix) sums in place from init [R, L]; total into out [R, L]."""
    R, NS, L = x.shape
    BLK = 1024 if L >= 1024 else _pow2(L)
    _scan_kernel[(triton.cdiv(L, BLK), R)](
        x, init if init is not None else out, out, NS, L, HAS_INIT=init is not None, REVERSE=reverse, BLK=BLK,
        num_warps=4,
    )


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """[..., D] x [..., D] -> [...] fp32 dot products, one pass over both inputs (no fp32 copies)."""
    D = a.shape[-1]
    out = torch.empty(a.shape[:-1], device=a.device, dtype=torch.float32)
    N = out.numel()
    BDV = _pow2(D)
    BR = max(1, 4096 // BDV)
    _delta_kernel[(triton.cdiv(N, BR),)](a, b, out, N, D=D, BR=BR, BDV=BDV, num_warps=4)
    return out


def _prec(x: Tensor) -> str:
    # fp32 inputs are the reference path: exact fp32 products (no tf32). bf16/fp16 ignore this.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def hybrid_fwd(q, k, v, fq, fk, gamma, S0, z0, *, window, scale, eps, n0, store_state, chunk_size=None,
               sub_chunks=None, launch: ForwardLaunch = DEFAULT_FORWARD_LAUNCH):
    """Chunk-parallel forward. Pass 1 (``_state_kernel``, parallel over superchunks) writes each superchunk's
    phi(K)^T V and key sum in fp32; pass 2 (``_scan_kernel``) turns them into the state before every superchunk
    (exclusive prefix sum from the initial state; the total is the final state); pass 3 (``_fwd_kernel``, parallel
    over superchunks, query heads and D blocks) walks the NSUB chunks of its superchunk with the state on-chip.
    Returns o, S_end, z_end, den, cmax, carg, SP, ZP, NSUB (SP/ZP are kept for the backward)."""
    B, H, T, F = fq.shape
    _, HK, Tk, DV = v.shape
    HS = fk.shape[1]
    DK = q.shape[-1] if window > 0 else 16
    P = Tk - T
    BT, BF, BD = _blocks(F, DV, chunk_size, v.dtype)
    BD = launch.block_d or BD
    ND = triton.cdiv(DV, BD)
    NSUB = _nsub(T, BT, ND * B * H, sub_chunks)
    NS = triton.cdiv(T, NSUB * BT)
    dev = v.device
    f32 = torch.float32
    prec = _prec(v)
    warps = 4 if BF * BD <= 4096 else 8
    o = torch.empty(B, H, T, DV, device=dev, dtype=v.dtype)
    den = torch.empty(B, H, T, device=dev, dtype=f32)
    cmax = torch.empty(B, H, T, device=dev, dtype=f32) if window > 0 else den
    carg = torch.empty(B, H, T, device=dev, dtype=torch.int32) if window > 0 else den
    SE = ZE = None
    if NS > 1 or store_state:
        SP = torch.empty(B * HS, NS, F, DV, device=dev, dtype=f32)
        ZP = torch.empty(B * HS, NS, F, device=dev, dtype=f32)
        _state_kernel[(ND, NS, B * HS)](
            fk, v, SP, ZP, T, Tk, P, n0, NS,
            HK=HK, HS=HS, DV=DV, F=F, W=window, BT=BT, NSUB=NSUB, BD=BD, BF=BF, PREC=prec, num_warps=warps,
        )
        SE = torch.empty(B, HS, F, DV, device=dev, dtype=f32)
        ZE = torch.empty(B, HS, F, device=dev, dtype=f32)
        _scan(SP.view(B * HS, NS, F * DV), S0.view(B * HS, F * DV), SE.view(B * HS, F * DV), reverse=False)
        _scan(ZP, z0.view(B * HS, F), ZE.view(B * HS, F), reverse=False)
    else:  # one superchunk: the state before it is the initial state
        SP, ZP = S0, z0
    qq, kk, gg = (q, k, gamma) if window > 0 else (fq, fk, den)
    _fwd_kernel[(ND, NS, B * H)](
        qq, kk, v, fq, fk, gg, SP, ZP, o, den, cmax, carg,
        float(scale), float(eps), T, Tk, P, n0, NS,
        H=H, HK=HK, HS=HS, DK=DK, DV=DV, F=F, W=window, BT=BT, NSUB=NSUB, BDK=_pow2(DK), BD=BD, BF=BF,
        PREC=prec, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return o, SE, ZE, den, cmax, carg, SP, ZP, NSUB


def hybrid_bwd(q, k, v, fq, fk, gamma, SP, ZP, o, do, den, cmax, carg, dSf, dzf, *, window, scale, n0, nsub,
               chunk_size=None, dden=None, dcmax=None, need=(True, True, True, True)):
    """Gradients of (o, final state) and, where given, of the forward's normaliser ``den`` (``dden``) and window
    max ``cmax`` (``dcmax``): d den only changes the per-row term ``dden_t = -delta_t / den_t`` every kernel reads,
    so it enters as ``delta - dden * den``; d cmax joins the gradient routed to the argmax key.

    ``need`` = whether dq, dk, dv, dgamma are wanted (autograd's ``needs_input_grad``); the others come back None
    and are not computed. Attention transfer trains only the feature maps and gamma on recorded q, k, v: it skips
    the window's dk/dv pass and every q/k/v-sized fp32 gradient."""
    need_dq, need_dk, need_dv, need_dg = need
    need_dq, need_dk, need_dg = (n and window > 0 for n in (need_dq, need_dk, need_dg))  # window-only gradients
    B, H, T, F = fq.shape
    _, HK, Tk, DV = v.shape
    HS = fk.shape[1]
    P = Tk - T
    BT, BF, BD = _blocks(F, DV, chunk_size, v.dtype)
    NDB = triton.cdiv(DV, BD)
    NS = triton.cdiv(T, nsub * BT)
    dev = v.device
    f32 = torch.float32
    do = do.contiguous()
    delta = _rowdot(do, o)  # do . o, [B, H, T] fp32
    if dden is not None:
        delta = delta - dden.float() * den
    prec = _prec(v)
    warps = 4 if BF * BD <= 4096 else 8
    grid = (NDB, NS, B * H)

    dfq_p = torch.empty(NDB, B, H, T, F, device=dev, dtype=f32)
    _lin_dq_kernel[grid](
        fq, fk, v, SP, ZP, do, den, delta, dfq_p, T, Tk, P, n0, NS,
        H=H, HK=HK, HS=HS, DV=DV, F=F, W=window, BT=BT, NSUB=nsub, BD=BD, BF=BF, PREC=prec, num_warps=warps,
    )
    # state gradient entering each superchunk from the later ones (reverse exclusive scan), per query head
    dSP = torch.empty(B * H, NS, F, DV, device=dev, dtype=f32)
    dZP = torch.empty(B * H, NS, F, device=dev, dtype=f32)
    _dstate_kernel[grid](
        fq, do, den, delta, dSP, dZP, T, NS, DV=DV, F=F, BT=BT, NSUB=nsub, BD=BD, BF=BF, PREC=prec, num_warps=warps,
    )
    dS0 = torch.empty(B, H, F, DV, device=dev, dtype=f32)
    dz0 = torch.empty(B, H, F, device=dev, dtype=f32)
    init_S = init_z = None
    if dSf is not None:  # the final-state gradient enters once per state head (its first query head)
        init_S = torch.zeros(B, HS, H // HS, F, DV, device=dev, dtype=f32)
        init_z = torch.zeros(B, HS, H // HS, F, device=dev, dtype=f32)
        init_S[:, :, 0] = dSf
        init_z[:, :, 0] = dzf
        init_S, init_z = init_S.view(B * H, F * DV), init_z.view(B * H, F)
    _scan(dSP.view(B * H, NS, F * DV), init_S, dS0.view(B * H, F * DV), reverse=True)
    _scan(dZP, init_z, dz0.view(B * H, F), reverse=True)
    dfk_p = torch.zeros(NDB, B, H, Tk, F, device=dev, dtype=f32)
    win_kv = need_dk or (need_dv and window > 0)  # the window's key-side pass (dk, and dv's window part)
    # dv's window part accumulates onto the linear part, so the window pass needs the buffer even for dk alone
    dv_h = torch.zeros(B, H, Tk, DV, device=dev, dtype=f32) if need_dv or win_kv else None
    _lin_dkv_kernel[grid](
        fq, fk, v, do, den, delta, dSP, dZP, dfk_p, dfk_p if dv_h is None else dv_h, T, Tk, P, n0, NS,
        H=H, HK=HK, HS=HS, DV=DV, F=F, W=window, BT=BT, NSUB=nsub, BD=BD, BF=BF, PREC=prec, NEED_DV=need_dv,
        num_warps=warps,
    )
    dfq = dfq_p.sum(0) if NDB > 1 else dfq_p[0]
    dfk = (dfk_p.sum(0) if NDB > 1 else dfk_p[0]).view(B, HS, H // HS, Tk, F).sum(2)
    dS0 = dS0.view(B, HS, H // HS, F, DV).sum(2)
    dz0 = dz0.view(B, HS, H // HS, F).sum(2)

    dq = dk = dgamma = None
    DK = q.shape[-1] if window > 0 else 16
    BTW = min(BT, 64)
    if win_kv:
        dk_h = torch.empty(B, H, Tk, DK, device=dev, dtype=f32)
        _win_dkv_kernel[(triton.cdiv(Tk, BTW), B * H)](
            q, k, v, gamma, do, den, delta, cmax, dk_h, dv_h, float(scale), T, Tk, P,
            H=H, HK=HK, DK=DK, DV=DV, W=window, BT=BTW, BDK=_pow2(DK), BDV=_pow2(DV), PREC=prec, num_warps=4,
        )
    if need_dq or need_dk or need_dg:  # R_t: d gamma, and the max's gradient for dq / dk
        dq = torch.empty(B, H, T, DK, device=dev, dtype=f32) if need_dq else None
        r = torch.empty(B, H, T, device=dev, dtype=f32)
        _win_dq_kernel[(triton.cdiv(T, BTW), B * H)](
            q, k, v, gamma, do, den, delta, cmax, r if dq is None else dq, r, float(scale), T, Tk, P,
            H=H, HK=HK, DK=DK, DV=DV, W=window, BT=BTW, BDK=_pow2(DK), BDV=_pow2(DV), PREC=prec, NEED_DQ=need_dq,
            num_warps=4,
        )
        if need_dg:
            dgamma = r.double().sum((0, 2)).float()
        if need_dq or need_dk:  # gradient through c_t = max over the window: d c_t = -gamma * R_t, to the argmax key
            dc = -gamma.float()[None, :, None] * r
            if dcmax is not None:
                dc = dc + dcmax.float()
            dc = (dc * scale)[..., None]  # [B, H, T, 1]
            if need_dq:
                rep = H // HK
                hk_idx = torch.arange(H, device=dev) // rep
                b_idx = torch.arange(B, device=dev)
                flat = ((b_idx[:, None, None] * HK + hk_idx[None, :, None]) * Tk + carg.long())  # [B, H, T] rows of k
                dq += dc * k.reshape(B * HK * Tk, DK)[flat].float()
            if need_dk:
                idx = carg.long()[..., None]
                dk_h.scatter_add_(2, idx.expand(B, H, T, DK), dc * q.float())
                dk = dk_h.view(B, HK, H // HK, Tk, DK).sum(2)
    dv = dv_h.view(B, HK, H // HK, Tk, DV).sum(2) if need_dv else None
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
    def forward(ctx, q, k, v, fq, fk, gamma, S0, z0, window, scale, eps, n0, store_state, chunk_size, sub_chunks,
                launch, stats):
        q, k, v, fq, fk, gamma, S0, z0 = _contiguous(q, k, v, fq, fk, gamma, S0, z0)
        o, SE, ZE, den, cmax, carg, SP, ZP, nsub = hybrid_fwd(
            q, k, v, fq, fk, gamma, S0, z0, window=window, scale=scale, eps=eps, n0=n0, store_state=store_state,
            chunk_size=chunk_size, sub_chunks=sub_chunks, launch=launch,
        )
        ctx.save_for_backward(q, k, v, fq, fk, gamma, SP, ZP, o, den, cmax, carg)
        ctx.cfg = (window, scale, n0, chunk_size, nsub, stats)
        out = (o, SE, ZE) if store_state else (o, None, None)
        # stats: the normaliser (eps included) and the window max, so that sinks.add_sinks can add more keys
        return out + (den, cmax) if stats else out

    @staticmethod
    def backward(ctx, do, dSf, dzf, dden=None, dcmax=None):
        q, k, v, fq, fk, gamma, SP, ZP, o, den, cmax, carg = ctx.saved_tensors
        window, scale, n0, chunk_size, nsub, stats = ctx.cfg
        B, HS, _, F = fk.shape
        DV = v.shape[-1]
        if dSf is not None or dzf is not None:
            dSf = v.new_zeros(B, HS, F, DV, dtype=torch.float32) if dSf is None else dSf.float().contiguous()
            dzf = v.new_zeros(B, HS, F, dtype=torch.float32) if dzf is None else dzf.float().contiguous()
        nq, nk, nv, _, _, ng = ctx.needs_input_grad[:6]
        dq, dk, dv, dfq, dfk, dgamma, dS0, dz0 = hybrid_bwd(
            q, k, v, fq, fk, gamma, SP, ZP, o, do, den, cmax, carg, dSf, dzf,
            window=window, scale=scale, n0=n0, nsub=nsub, chunk_size=chunk_size,
            dden=dden if stats else None, dcmax=dcmax if stats else None, need=(nq, nk, nv, ng),
        )
        cast = lambda g, x: None if g is None or x is None else g.to(x.dtype)  # noqa: E731
        return (
            cast(dq, q), cast(dk, k), cast(dv, v), cast(dfq, fq),
            cast(dfk, fk), cast(dgamma, gamma), dS0, dz0,
            None, None, None, None, None, None, None, None, None,
        )


# --------------------------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------------------------


MAX_GRID_BH = 65535
"""Largest batch x heads one launch takes: the kernels put it on a grid axis that CUDA caps at 2**16 - 1."""


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
    sub_chunks: int | None = None,
    launch: ForwardLaunch | None = None,
    sinks: Sinks | None = None,
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
        sub_chunks: chunks per superchunk (the unit of parallelism along T; one fp32 state is stored per
            superchunk); default: chosen from T and B * H to fill the GPU (``_nsub``).
        launch: launch options of the forward (:class:`ForwardLaunch`); default: the measured best.
        sinks: optional sink keys (``naive.py``), added from the kernel's normaliser and window max by
            ``sinks.add_sinks``.

    Returns:
        ``(o [B, H, T, D] in v.dtype, (S, z) or None)``. Differentiable w.r.t. every tensor input and the initial
        state.

    Raises:
        ValueError: on inconsistent shapes (same checks as the reference).
    """
    B, H, T, Hk, Tk, Hs = _check_shapes(q, k, v, fq, fk, gamma, window)
    _check_sinks(sinks, B, Hk, q, v, window)
    if B > 1 and B * H > MAX_GRID_BH:  # grids put batch x heads on an axis CUDA caps at 65,535: slice the batch
        step = max(1, MAX_GRID_BH // H)
        parts = []
        for b0 in range(0, B, step):
            sl = slice(b0, b0 + step)
            parts.append(hybrid_attention_triton(
                *(None if x is None else x[sl] for x in (q, k, v, fq, fk)), gamma, window=window, scale=scale,
                initial_state=None if initial_state is None else (initial_state[0][sl], initial_state[1][sl]),
                output_final_state=output_final_state, eps=eps, chunk_size=chunk_size, sub_chunks=sub_chunks,
                launch=launch, sinks=None if sinks is None else tuple(x[sl] for x in sinks)))
        o = torch.cat([o for o, _ in parts])
        if not output_final_state:
            return o, None
        return o, (torch.cat([st[0] for _, st in parts]), torch.cat([st[1] for _, st in parts]))
    out_dtype = v.dtype
    dtypes = {x.dtype for x in (q, k, v, fq, fk) if x is not None}
    if len(dtypes) > 1:  # e.g. bf16 q/k/v with fp32 feature maps: the kernels' dots need one dtype, the widest
        common = functools.reduce(torch.promote_types, dtypes)
        q, k, v, fq, fk = (None if x is None else x.to(common) for x in (q, k, v, fq, fk))
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
        o = v.new_zeros(B, H, 0, D, dtype=out_dtype)
        return o, ((S0, z0) if output_final_state else None)
    o, S, z, *stats = HybridAttentionFunction.apply(
        q, k, v, fq, fk, gamma, S0, z0, window, float(scale), float(eps), n0, output_final_state, chunk_size,
        sub_chunks, launch or DEFAULT_FORWARD_LAUNCH, sinks is not None,
    )
    if sinks is not None:
        den, cmax = stats
        o = add_sinks(o, den, cmax, q, sinks, gamma, scale=scale, window=window, first_query=P)
    o = o.to(out_dtype)
    if not output_final_state:
        return o, None
    u_last = P + T - window  # the key that becomes linear at the next query
    if n0 <= u_last < Tk:
        S_add, z_add = _fold(fk[:, :, u_last : u_last + 1].float(), v[:, :, u_last : u_last + 1].float(), Hs)
        S, z = S + S_add, z + z_add
    return o, (S, z)
