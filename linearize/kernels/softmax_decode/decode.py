"""One softmax-attention decoding step over a preallocated KV buffer: Triton kernels (the contract and the
reference are in ``naive.py``).

Origin: written for linearize, split-K decoding in the manner of flash-decoding
(https://crfm.stanford.edu/2023/10/12/flashdecoding.html). Used by the softmax layers a converted model keeps
(``models/softmax.py``), so that their decode step has static shapes and addresses and a CUDA graph can hold it.

Layout: q [B, H, d], new k [B, Hk, d], v [B, Hk, D]; caches k_cache [B, Hk, C, d], v_cache [B, Hk, C, D] with key
j in slot j; pos [B] int32 = keys already cached (the new token's slot), a **device** tensor, so one launch
configuration serves every step: nothing about the launch depends on how full the buffer is.

Two launches:

1. ``_attend_kernel``, grid (NS splits, B * Hk): the program of split s reads key blocks s, s + NS, s + 2 NS, ...
   of BLOCK_N slots each, only while the block starts below ``pos[b]`` (filled slots only: the bytes read grow
   with the context, not with the capacity), for all G = H / Hk query heads of its kv head at once (each key is
   read once per kv head), and writes its online-softmax partials (running max m, sum l, unnormalised output) in
   fp32. Interleaved blocks keep the splits balanced at any length. The program of split 0 also writes the new
   key and value to slot ``pos[b]``; no program of this launch reads that slot (the new key enters in step 2),
   so no program reads another's write.
2. ``_combine_kernel``, grid (B * Hk): merges the NS partials and the new key's own term (read from the inputs)
   and writes o in ``v``'s dtype.

NS (:func:`splits`) depends on the batch, the kv heads and the capacity only: about 256 programs in launch 1 at
small batch (split along the keys for parallelism), one split once B * Hk alone fills the GPU. The caller
advances ``pos``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.softmax_decode.naive import check_decode

TARGET_PROGRAMS = 256
"""Programs launch 1 aims for at small batch (about two per SM on an H100): below it the keys are split."""
MAX_SPLITS = 16
"""At most this many splits: the combine kernel holds all NS partials of a kv head's G heads in registers."""


@triton.jit
def _attend_kernel(Q, K, V, KC, VC, POS, M_OUT, L_OUT, ACC_OUT, scale, C, NS,
                   H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, DK: tl.constexpr,
                   DK_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr, BLOCK_N: tl.constexpr):
    s_id = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    pos = tl.load(POS + b).to(tl.int32)
    g = tl.arange(0, G_P)
    dk = tl.arange(0, DK_P)
    dv = tl.arange(0, DV_P)
    gm = g < G
    dkm = dk < DK
    dvm = dv < DV
    heads = hk * G + g  # query heads of this kv head
    q = tl.load(Q + (b * H + heads)[:, None] * DK + dk[None, :], mask=gm[:, None] & dkm[None, :], other=0.0)
    q = q.to(tl.float32) * scale  # (G_P, DK_P)
    m = tl.full([G_P], float("-inf"), tl.float32)
    l = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, DV_P], tl.float32)
    kbase = KC + bh.to(tl.int64) * C * DK
    vbase = VC + bh.to(tl.int64) * C * DV
    for start in range(s_id * BLOCK_N, pos, NS * BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < pos  # filled slots only (the new key's slot pos is not read here)
        kt = tl.load(kbase + n[:, None] * DK + dk[None, :], mask=nm[:, None] & dkm[None, :], other=0.0)
        s = tl.sum(q[:, None, :] * kt.to(tl.float32)[None, :, :], axis=2)  # (G_P, BLOCK_N)
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: slot `start` < pos is filled
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        vt = tl.load(vbase + n[:, None] * DV + dv[None, :], mask=nm[:, None] & dvm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt.to(tl.float32)[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    part = (b * H + heads) * NS + s_id  # partials [B, H, NS(, DV)]
    tl.store(M_OUT + part, m, mask=gm)
    tl.store(L_OUT + part, l, mask=gm)
    tl.store(ACC_OUT + part[:, None] * DV + dv[None, :], acc, mask=gm[:, None] & dvm[None, :])
    if s_id == 0:  # the new token's slot, read by no program of this launch
        kn = tl.load(K + bh * DK + dk, mask=dkm)
        vn = tl.load(V + bh * DV + dv, mask=dvm)
        tl.store(kbase + pos.to(tl.int64) * DK + dk, kn.to(KC.dtype.element_ty), mask=dkm)
        tl.store(vbase + pos.to(tl.int64) * DV + dv, vn.to(VC.dtype.element_ty), mask=dvm)


@triton.jit
def _combine_kernel(Q, K, V, M_IN, L_IN, ACC_IN, O, scale, NS,
                    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, DK: tl.constexpr,
                    DK_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr, NS_P: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HK
    hk = bh % HK
    g = tl.arange(0, G_P)
    dk = tl.arange(0, DK_P)
    dv = tl.arange(0, DV_P)
    sp = tl.arange(0, NS_P)
    gm = g < G
    dkm = dk < DK
    dvm = dv < DV
    spm = sp < NS
    heads = hk * G + g
    # the new key's term, from the inputs
    q = tl.load(Q + (b * H + heads)[:, None] * DK + dk[None, :], mask=gm[:, None] & dkm[None, :], other=0.0)
    kn = tl.load(K + bh * DK + dk, mask=dkm, other=0.0).to(tl.float32)
    vn = tl.load(V + bh * DV + dv, mask=dvm, other=0.0).to(tl.float32)
    s_new = tl.sum(q.to(tl.float32) * scale * kn[None, :], axis=1)  # (G_P,)
    part = (b * H + heads)[:, None] * NS + sp[None, :]  # (G_P, NS_P)
    pm = gm[:, None] & spm[None, :]
    m_s = tl.load(M_IN + part, mask=pm, other=float("-inf"))
    l_s = tl.load(L_IN + part, mask=pm, other=0.0)
    m = tl.maximum(tl.max(m_s, axis=1), s_new)  # finite: the new key is always there
    w = tl.exp(m_s - m[:, None])  # 0 for empty splits (m_s = -inf)
    w_new = tl.exp(s_new - m)
    l = tl.sum(l_s * w, axis=1) + w_new
    acc_s = tl.load(ACC_IN + part[:, :, None] * DV + dv[None, None, :], mask=pm[:, :, None] & dvm[None, None, :],
                    other=0.0)  # (G_P, NS_P, DV_P)
    acc = tl.sum(acc_s * w[:, :, None], axis=1) + w_new[:, None] * vn[None, :]
    o = acc / l[:, None]
    tl.store(O + (b * H + heads)[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty), mask=gm[:, None] & dvm[None, :])


def splits(batch: int, kv_heads: int, capacity: int, block_n: int) -> int:
    """Key splits of launch 1 (module docstring): enough programs for ``TARGET_PROGRAMS``, never more than the
    buffer has blocks or ``MAX_SPLITS``."""
    want = triton.cdiv(TARGET_PROGRAMS, max(batch * kv_heads, 1))
    return max(1, min(want, triton.cdiv(capacity, block_n), MAX_SPLITS))


def _block_n(G_P: int, DK_P: int, DV_P: int) -> int:
    """Keys per block: the score and output tiles (G_P x BLOCK_N x d) stay near 8k fp32 elements per program."""
    return max(16, min(64, triton.next_power_of_2(8192 // (G_P * max(DK_P, DV_P)))))


def softmax_decode_step_triton(q: Tensor, k: Tensor, v: Tensor, *, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                               scale: float, num_splits: int | None = None) -> Tensor:
    """The step of ``naive.softmax_decode_step_naive`` in two launches (module docstring).

    Args:
        q [B, H, d], k [B, Hk, d], v [B, Hk, D]: the new token; made contiguous if they are not.
        k_cache [B, Hk, C, d], v_cache [B, Hk, C, D]: contiguous buffers; slot ``pos[b]`` receives k, v.
        pos [B]: keys already cached per sequence (``pos[b] < C``, not checked: that would need a host sync);
            not advanced here.
        scale: the softmax scale.
        num_splits: key splits of launch 1 (None = :func:`splits`); a test knob.

    Returns:
        o [B, H, D] in ``v.dtype``.

    Raises:
        ValueError: shapes off the layout, or non-contiguous caches (they are written in place).
    """
    check_decode(q, k, v, k_cache, v_cache, pos)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache are written in place and must be contiguous")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, DK = q.shape
    Hk, C, DV = k_cache.shape[1], k_cache.shape[2], v.shape[2]
    G = H // Hk
    G_P, DK_P, DV_P = triton.next_power_of_2(G), triton.next_power_of_2(DK), triton.next_power_of_2(DV)
    BLOCK_N = _block_n(G_P, DK_P, DV_P)
    NS = num_splits or splits(B, Hk, C, BLOCK_N)
    m = torch.empty(B, H, NS, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, NS, DV, dtype=torch.float32, device=q.device)
    o = torch.empty(B, H, DV, dtype=v.dtype, device=q.device)
    dims = {"H": H, "HK": Hk, "G": G, "G_P": G_P, "DK": DK, "DK_P": DK_P, "DV": DV, "DV_P": DV_P}
    _attend_kernel[(NS, B * Hk)](q, k, v, k_cache, v_cache, pos, m, l, acc, scale, C, NS, **dims, BLOCK_N=BLOCK_N)
    _combine_kernel[(B * Hk,)](q, k, v, m, l, acc, o, scale, NS, **dims, NS_P=triton.next_power_of_2(NS))
    return o


__all__ = ["softmax_decode_step_triton", "splits"]
