"""Fused Triton form of ``sinks.add_sinks`` (the reference) for the case where only the chunk kernel's output, its
normaliser, its window max and gamma need gradients: attention transfer, where q, k and v are recorded and the sinks
are picked from them. One pass forward, one pass backward, per (block of query rows, batch x head).

Forward, per query ``t`` with key index ``i = first_query + t`` (every product and sum in fp32)::

    s_e = scale * q_t . k_e  for sinks with pos_e <= i - window  (-inf otherwise)
    m = max(c_t, max_e s_e);  A = den_t exp(c_t - m);  p_e = gamma exp(s_e - m)
    out_t = (A o_t + sum_e p_e v_e) / Z,  Z = A + sum_e p_e

Backward, with ``g`` = d out_t (``out`` does not depend on ``m``, so ``m`` is held constant)::

    d o_t = g A / Z;   dA = (g . o_t - g . out_t) / Z;   d den_t = dA exp(c_t - m);   d c_t = dA A
    d p_e = (g . v_e - g . out_t) / Z;   d gamma += sum_e d p_e exp(s_e - m)

The PyTorch form is ~7 full-size fp32 passes forward and ~8 backward (the casts of q and o, the products, the
quotient and their gradients); this reads o (and g, out) once in their own dtype.

Status (2026-12-02): parity-tested in fp32 under the Triton interpreter (``tests/kernels/test_sinks.py``), not yet
compiled or timed on a GPU, so ``chunk.hybrid_attention_triton`` still calls the PyTorch form.
``tests/gpu/test_gpu_sinks.py`` checks it in bf16 and ``benchmarks/gpu_sinks_fused.py`` times both forms at 7-8B
shapes; wire it in after that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.hybrid.chunk import _pow2, _prec
from linearize.kernels.hybrid.naive import Sinks


@triton.jit
def _prologue(Q, KS, VS, POS, G, DEN, C, scale, first_query, T, E, window,
              H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
              BDK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    """This program's rows (a block of queries of one batch x head): their offsets into [B, H, T, D] tensors and
    mask, the sink scores [BT, BE] (-inf where a sink is not visible or absent), gamma of the head, the window max c
    and the normaliser den, and the sink values [BE, BD]."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh = pid_bh.to(tl.int64)
    bhk = (b * HK + h // (H // HK)).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    mt = t < T
    offs_dk = tl.arange(0, BDK)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    mdk = offs_dk < DK
    me = offs_e < E
    q = tl.load(Q + bh * T * DK + t[:, None] * DK + offs_dk[None, :], mask=mt[:, None] & mdk[None, :], other=0.0)
    ks = tl.load(KS + bhk * E * DK + offs_e[:, None] * DK + offs_dk[None, :], mask=me[:, None] & mdk[None, :],
                 other=0.0)
    vs = tl.load(VS + bhk * E * D + offs_e[:, None] * D + offs_d[None, :], mask=me[:, None] & (offs_d < D)[None, :],
                 other=0.0)
    pos = tl.load(POS + b * E + offs_e, mask=me, other=0)
    s = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale
    visible = me[None, :] & (pos[None, :] <= (first_query + t - window)[:, None])
    s = tl.where(visible, s, float("-inf"))
    g = tl.load(G + h).to(tl.float32)
    c = tl.load(C + bh * T + t, mask=mt, other=0.0)
    den = tl.load(DEN + bh * T + t, mask=mt, other=1.0)
    tile = bh * T * D + t[:, None] * D + offs_d[None, :]
    mtd = mt[:, None] & (offs_d < D)[None, :]
    return bh, t, mt, tile, mtd, s, g, c, den, vs


@triton.jit
def _sinks_fwd_kernel(
    O, DEN, C, Q, KS, VS, POS, G, OUT, M, Z,
    scale, first_query, T, E, window,
    H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, D: tl.constexpr,
    BT: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr,
):
    bh, t, mt, tile, mtd, s, g, c, den, vs = _prologue(
        Q, KS, VS, POS, G, DEN, C, scale, first_query, T, E, window,
        H=H, HK=HK, DK=DK, D=D, BT=BT, BDK=BDK, BD=BD, BE=BE, PREC=PREC)
    m = tl.maximum(c, tl.max(s, 1))
    A = den * tl.exp(c - m)
    p = tl.exp(s - m[:, None]) * g  # exp(-inf) = 0 for hidden sinks
    o = tl.load(O + tile, mask=mtd, other=0.0)
    z = A + tl.sum(p, 1)
    num = o.to(tl.float32) * A[:, None] + tl.dot(p.to(vs.dtype), vs, input_precision=PREC)
    tl.store(OUT + tile, (num / z[:, None]).to(OUT.dtype.element_ty), mask=mtd)
    tl.store(M + bh * T + t, m, mask=mt)
    tl.store(Z + bh * T + t, z, mask=mt)


@triton.jit
def _sinks_bwd_kernel(
    GO, O, OUT, DEN, C, M, Z, Q, KS, VS, POS, G,
    DO, DDEN, DC, DG,
    scale, first_query, T, E, window, NTB,
    H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, D: tl.constexpr,
    BT: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr,
):
    bh, t, mt, tile, mtd, s, g, c, den, vs = _prologue(
        Q, KS, VS, POS, G, DEN, C, scale, first_query, T, E, window,
        H=H, HK=HK, DK=DK, D=D, BT=BT, BDK=BDK, BD=BD, BE=BE, PREC=PREC)
    m = tl.load(M + bh * T + t, mask=mt, other=0.0)
    z = tl.load(Z + bh * T + t, mask=mt, other=1.0)
    alpha = tl.exp(c - m)
    A = den * alpha
    es = tl.exp(s - m[:, None])  # p / gamma
    go = tl.load(GO + tile, mask=mtd, other=0.0)
    o = tl.load(O + tile, mask=mtd, other=0.0).to(tl.float32)
    out = tl.load(OUT + tile, mask=mtd, other=0.0).to(tl.float32)
    gf = go.to(tl.float32)
    g_o = tl.sum(gf * o, 1)
    g_out = tl.sum(gf * out, 1)
    gv = tl.dot(go.to(vs.dtype), tl.trans(vs), input_precision=PREC)  # [BT, BE]
    dA = (g_o - g_out) / z
    dp = (gv - g_out[:, None]) / z[:, None]
    tl.store(DO + tile, (gf * (A / z)[:, None]).to(DO.dtype.element_ty), mask=mtd)
    tl.store(DDEN + bh * T + t, dA * alpha, mask=mt)
    tl.store(DC + bh * T + t, dA * A, mask=mt)
    dg = tl.sum(tl.sum(tl.where(mt[:, None], dp * es, 0.0), 1), 0)
    tl.store(DG + bh * NTB + tl.program_id(0), dg)


def _geometry(o: Tensor, k_s: Tensor):
    B, H, T, D = o.shape
    HK, E, DK = k_s.shape[1], k_s.shape[2], k_s.shape[3]
    BT = 64 if max(D, DK) <= 128 else 32
    return B, H, T, D, HK, E, DK, BT


class _AddSinks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, den, c, gamma, q, k_s, v_s, pos, scale, window, first_query):
        B, H, T, D, HK, E, DK, BT = _geometry(o, k_s)
        out = torch.empty_like(o)
        m = torch.empty(B, H, T, device=o.device, dtype=torch.float32)
        z = torch.empty_like(m)
        grid = (triton.cdiv(T, BT), B * H)
        _sinks_fwd_kernel[grid](
            o, den, c, q, k_s, v_s, pos, gamma, out, m, z, float(scale), int(first_query), T, E, int(window),
            H=H, HK=HK, DK=DK, D=D, BT=BT, BDK=_pow2(DK), BD=_pow2(D), BE=_pow2(E), PREC=_prec(o), num_warps=4,
        )
        ctx.save_for_backward(o, den, c, gamma, q, k_s, v_s, pos, out, m, z)
        ctx.cfg = (float(scale), int(window), int(first_query))
        return out

    @staticmethod
    def backward(ctx, go):
        o, den, c, gamma, q, k_s, v_s, pos, out, m, z = ctx.saved_tensors
        scale, window, first_query = ctx.cfg
        B, H, T, D, HK, E, DK, BT = _geometry(o, k_s)
        NTB = triton.cdiv(T, BT)
        go = go.contiguous()
        do = torch.empty_like(o)
        dden = torch.empty_like(den)
        dc = torch.empty_like(c)
        dg = torch.empty(B, H, NTB, device=o.device, dtype=torch.float32)
        _sinks_bwd_kernel[(NTB, B * H)](
            go, o, out, den, c, m, z, q, k_s, v_s, pos, gamma, do, dden, dc, dg,
            scale, first_query, T, E, window, NTB,
            H=H, HK=HK, DK=DK, D=D, BT=BT, BDK=_pow2(DK), BD=_pow2(D), BE=_pow2(E), PREC=_prec(o), num_warps=4,
        )
        dgamma = dg.double().sum((0, 2)).to(gamma.dtype) if ctx.needs_input_grad[3] else None
        return do, dden, dc, dgamma, None, None, None, None, None, None, None


def add_sinks_fused(o: Tensor, den: Tensor, c: Tensor, q: Tensor, sinks: Sinks, gamma: Tensor, *, scale: float,
                    window: int, first_query: int) -> Tensor:
    """``sinks.add_sinks`` in one Triton pass (same arguments and result). Differentiable in ``o``, ``den``, ``c``
    and ``gamma`` only: callers whose ``q`` or sinks need gradients use the PyTorch form.

    Raises:
        ValueError: when ``q`` or the sink keys or values require gradients.
    """
    k_s, v_s, pos = sinks
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_s, v_s)):
        raise ValueError("add_sinks_fused has no gradient for q or the sinks; use sinks.add_sinks")
    dtype = o.dtype
    q, k_s, v_s = (x.to(dtype).contiguous() for x in (q, k_s, v_s))
    return _AddSinks.apply(o.contiguous(), den.float().contiguous(), c.float().contiguous(),
                           gamma.float().contiguous(), q, k_s, v_s, pos.contiguous().to(torch.int64), scale, window,
                           first_query)


__all__ = ["add_sinks_fused"]
