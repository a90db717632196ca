"""One decoding step of causal hybrid / linear attention: a fused Triton kernel and its PyTorch reference.

Origin: written for linearize from the definition in ``naive.py``. The step is exactly
``hybrid_attention_chunked`` with ``T = 1``, the last ``W - 1`` keys as prefix and the running state as
``initial_state`` (``output_final_state=True``), updating the caches and the state in place.

Cache layout (ring buffers of ``W`` slots, key ``j`` lives in slot ``j % W``):

    k_cache  [B, Hk, W, d]    v_cache [B, Hk, W, D]    fk_cache [B, Hs, W, F]
    state    (S [B, Hs, F, D], z [B, Hs, F]) fp32, covering keys j <= pos - W  (naive's final state after a
             prefill of ``pos`` tokens)
    pos      [B] int32/int64: absolute position of the new token (= tokens already seen); the caller advances it.

Step for the new token at position i = pos[b]:
  1. the window is keys (i - W, i]: the W - 1 cached keys plus the new one (read from the inputs, never from the
     cache slot being written, so no program reads another's write);
  2. o = (g * sum_win exp(s - c) v + fq S) / (g * sum_win exp(s - c) + fq z + eps);
  3. the new k, v, fk are written to slot i % W (that slot held key i - W, already in the state);
  4. key i - W + 1 (slot (i + 1) % W), which leaves the window for the next query, is folded into S and z.
With W == 0 the new key is folded first and the output is read from the state alone.

Two launch paths (:class:`DecodeLaunch`; by default :meth:`DecodeLaunch.resolve` picks one per call):

* fused (``split_f=None``; the choice below B * H = 2,048): one program per (D block of 64 columns, batch, state
  head) reads its state tile once for all query heads of the GQA group and writes it back once: the step is bound by the fp32 state traffic
  2 * F * D * 4 bytes per state head plus the window cache reads W * (d + D) * 2 bytes per key head (the window
  keys are re-read by each D block, from L2). Measured on H200 it reaches ~1.3 TB/s at B * H = 2048 (CUDA graph),
  30% of HBM; below B * H ~ 256 the step is launch-bound (capture it in a CUDA graph). Few programs (B * Hs when
  D <= 64), each with one large tile in registers and a long serial chain (state load, window scores, stores):
  too little memory traffic in flight per SM. Caveat: with more than one D block (D > block_d, e.g. D = 128) the
  D blocks of one state head race on z (block 0 writes the folded z, the others read z for their normaliser); the
  Triton interpreter, which runs the programs one after another, shows it every time
  (``test_fused_decode_d_blocks_race_on_z``); the split path does not have this race.
* split (``split_f=k``; the choice from B * H = 2,048, with k = 1): two kernels. The state kernel has one program
  per (F block of ceil(F / k) rows, D block of up to 128 columns, batch, state head), 1D grid with the F block fastest (consecutive programs stream
  consecutive rows); each loads its tile, writes fp32 partial sums of fq . S (and, in D block 0, of fq . z) per
  query head of the group to a scratch ``[NF, B * H, D + 1]``, folds the leaving key (or, with W == 0, the new
  one, before the partials) and stores the tile; D block 0 also writes the new phi(k) slot. The window kernel has
  one program per (batch, key head) (and D block, only when D > 128): it reads the window and sinks once for all
  H / Hk query heads, sums the NF partials, combines (same arithmetic as the fused kernel) and writes o and the
  new k / v slots. Both read the new key from the inputs; the state kernel reads only slot (i + 1) % W of the
  caches, the window kernel writes only slot i % W, and it runs after the state kernel (stream order), so no
  program reads another's write. Costs against the fused path: a second launch (a few us, what matters at small
  B * H even inside a CUDA graph), the partials (written and read back, 2 * NF * (H / Hs) * D * 4 bytes per
  state head against the 2 * F * D * 4 of the state: ~9% at NF = 4, H / Hs = 3, F = 128; likely L2-resident
  between the two kernels) and per-step scratch from the caching allocator (shape-dependent only, CUDA-graph
  safe). Gains expected at large B * H: NF * ND times more, smaller state programs, and the window scored once
  per key head instead of once per D block and state head. Measured on H200 (2026-12-01,
  ``benchmarks/gpu_decode_kernel.py``, results/decode-kernel-h200-2026-12-01.json): one F block is best; against
  the fused kernel 0.87x at B * H = 252, 1.13-1.37x at 2,052 and 1.25-1.53x at 8,190 (up to 1.95 TB/s, 41% of HBM
  for SmolLM2's heads; 1.6 TB/s for D = F = 128), still short of the 70% the step could reach.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.hybrid.decode_torch import _check_decode, _check_window_decode, _squeeze_t, sink_arguments
from linearize.kernels.hybrid.naive import State

# --------------------------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    Q, K, V, FQ, FK, G, KC, VC, FKC, S, Z, POS, KS, VS, SPOS, O,
    scale, eps,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr, E: tl.constexpr,
    BW: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BE: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bs = tl.program_id(1)
    b = pid_bs // HS
    hs = pid_bs % HS
    hk = hs // (HS // HK)
    bhs = pid_bs.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    i = tl.load(POS + b).to(tl.int32)

    st_ptr = S + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :]
    st_mask = mf[:, None] & md[None, :]
    s_state = tl.load(st_ptr, mask=st_mask, other=0.0)
    z = tl.load(Z + bhs * F + offs_f, mask=mf, other=0.0)
    fk_new = tl.load(FK + bhs * F + offs_f, mask=mf, other=0.0).to(tl.float32)
    v_new = tl.load(V + bhk * DV + offs_d, mask=md, other=0.0).to(tl.float32)

    if W == 0:
        s_state += fk_new[:, None] * v_new[None, :]
        z += fk_new
    else:
        offs_w = tl.arange(0, BW)
        offs_dk = tl.arange(0, BDK)
        mdk = offs_dk < DK
        slot_new = i % W
        # slot r holds key j_r = i - ((i - r) mod W); keep the ones inside the window and >= 0
        j_r = i - ((i - offs_w + W) % W)
        ok = (offs_w < W) & (j_r >= 0)
        is_new = offs_w == slot_new
        k_new = tl.load(K + bhk * DK + offs_dk, mask=mdk, other=0.0).to(tl.float32)
        kw = tl.load(KC + bhk * W * DK + offs_w[:, None] * DK + offs_dk[None, :], mask=(ok & ~is_new)[:, None] & mdk[None, :], other=0.0).to(tl.float32)
        kw = tl.where(is_new[:, None], k_new[None, :], kw)
        vw = tl.load(VC + bhk * W * DV + offs_w[:, None] * DV + offs_d[None, :], mask=(ok & ~is_new)[:, None] & md[None, :], other=0.0).to(tl.float32)
        vw = tl.where(is_new[:, None], v_new[None, :], vw)
        if E > 0:  # sink keys that left the window (position <= i - W); empty slots hold a huge position
            offs_e = tl.arange(0, BE)
            sp = tl.load(SPOS + b * E + offs_e, mask=offs_e < E, other=2147483647)
            seen = (offs_e < E) & (sp <= i - W)
            ks = tl.load(KS + bhk * E * DK + offs_e[:, None] * DK + offs_dk[None, :], mask=seen[:, None] & mdk[None, :], other=0.0).to(tl.float32)
            vs = tl.load(VS + bhk * E * DV + offs_e[:, None] * DV + offs_d[None, :], mask=seen[:, None] & md[None, :], other=0.0).to(tl.float32)

    for r in range(H // HS):
        h = hs * (H // HS) + r
        bh = (b * H + h).to(tl.int64)
        fq = tl.load(FQ + bh * F + offs_f, mask=mf, other=0.0).to(tl.float32)
        num = tl.sum(fq[:, None] * s_state, 0)
        den = tl.sum(fq * z, 0)
        if W > 0:
            q = tl.load(Q + bh * DK + offs_dk, mask=mdk, other=0.0).to(tl.float32)
            g = tl.load(G + h).to(tl.float32)
            sc = tl.sum(q[None, :] * kw, 1) * scale
            sc = tl.where(ok, sc, float("-inf"))
            c = tl.max(sc, 0)
            if E > 0:  # rescale everything by exp(c - m), m = max(c, sink scores): finite, the same quotient
                ss = tl.where(seen, tl.sum(q[None, :] * ks, 1) * scale, float("-inf"))
                m = tl.maximum(c, tl.max(ss, 0))
                alpha = tl.exp(c - m)
                p = tl.exp(sc - m) * g
                ps = tl.exp(ss - m) * g
                num = alpha * num + tl.sum(p[:, None] * vw, 0) + tl.sum(ps[:, None] * vs, 0)
                den = alpha * (den + eps) + tl.sum(p, 0) + tl.sum(ps, 0) - eps
            else:
                p = tl.exp(sc - c) * g
                num += tl.sum(p[:, None] * vw, 0)
                den += tl.sum(p, 0)
        tl.store(O + bh * DV + offs_d, (num / (den + eps)).to(O.dtype.element_ty), mask=md)

    if W > 0:
        # write the new key into its slot (one writer per key head / state head)
        if pid_d == 0:
            tl.store(FKC + bhs * W * F + slot_new * F + offs_f, fk_new.to(FKC.dtype.element_ty), mask=mf)
        if hs % (HS // HK) == 0:
            if pid_d == 0:
                tl.store(KC + bhk * W * DK + slot_new * DK + offs_dk, k_new.to(KC.dtype.element_ty), mask=mdk)
            tl.store(VC + bhk * W * DV + slot_new * DV + offs_d, v_new.to(VC.dtype.element_ty), mask=md)
        # fold key i - W + 1, which leaves the window for the next query
        u = i - W + 1
        slot_old = (i + 1) % W
        if u >= 0:
            if slot_old == slot_new:  # W == 1: the leaving key is the new one
                fk_o = fk_new
                v_o = v_new
            else:
                fk_o = tl.load(FKC + bhs * W * F + slot_old * F + offs_f, mask=mf, other=0.0).to(tl.float32)
                v_o = tl.load(VC + bhk * W * DV + slot_old * DV + offs_d, mask=md, other=0.0).to(tl.float32)
            s_state += fk_o[:, None] * v_o[None, :]
            z += fk_o
    tl.store(st_ptr, s_state, mask=st_mask)
    if pid_d == 0:
        tl.store(Z + bhs * F + offs_f, z, mask=mf)


# --------------------------------------------------------------------------------------------------------------------
# split path: a state kernel (grid over F blocks x D blocks x batch * state heads) and a window kernel (grid over
# D blocks x batch * key heads) that combines the state kernel's partial sums
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_state_kernel(
    V, FQ, FK, VC, FKC, S, Z, POS, PN, PD,
    BH,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr,
    DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    NF: tl.constexpr, ND: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    # 1D grid, F block fastest: consecutive programs stream consecutive rows of one state tile
    pid = tl.program_id(0)
    pid_f = pid % NF
    pid_d = (pid // NF) % ND
    pid_bs = pid // (NF * ND)
    b = pid_bs // HS
    hs = pid_bs % HS
    hk = hs // (HS // HK)
    bhs = pid_bs.to(tl.int64)
    bhk = (b * HK + hk).to(tl.int64)
    offs_f = pid_f * BF + tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mf = offs_f < F
    md = offs_d < DV
    i = tl.load(POS + b).to(tl.int32)

    st_ptr = S + bhs * F * DV + offs_f[:, None] * DV + offs_d[None, :]
    st_mask = mf[:, None] & md[None, :]
    s_state = tl.load(st_ptr, mask=st_mask, other=0.0)
    # z only in the D block 0 programs, its only readers and writers (no program reads z after another wrote it)
    z = tl.load(Z + bhs * F + offs_f, mask=offs_f < tl.where(pid_d == 0, F, 0), other=0.0)
    fk_new = tl.load(FK + bhs * F + offs_f, mask=mf, other=0.0).to(tl.float32)
    v_new = tl.load(V + bhk * DV + offs_d, mask=md, other=0.0).to(tl.float32)
    if W == 0:  # the new key is in the state before the output reads it
        s_state += fk_new[:, None] * v_new[None, :]
        z += fk_new

    # partial sums of fq . S (this F block, this D block) and fq . z (this F block) per query head of the group
    for r in range(H // HS):
        bh = (b * H + hs * (H // HS) + r).to(tl.int64)
        fq = tl.load(FQ + bh * F + offs_f, mask=mf, other=0.0).to(tl.float32)
        tl.store(PN + (pid_f * BH + bh) * DV + offs_d, tl.sum(fq[:, None] * s_state, 0), mask=md)
        if pid_d == 0:
            tl.store(PD + pid_f * BH + bh, tl.sum(fq * z, 0))

    if W > 0:
        slot_new = i % W
        if pid_d == 0:  # the new phi(k) into its slot; nobody reads slot i % W in this step
            tl.store(FKC + bhs * W * F + slot_new * F + offs_f, fk_new.to(FKC.dtype.element_ty), mask=mf)
        # fold key i - W + 1 (slot (i + 1) % W), which leaves the window for the next query
        if i - W + 1 >= 0:
            if W == 1:  # the leaving key is the new one
                fk_o = fk_new
                v_o = v_new
            else:  # slot (i + 1) % W != i % W: written by no program of this step
                slot_old = (i + 1) % W
                fk_o = tl.load(FKC + bhs * W * F + slot_old * F + offs_f, mask=mf, other=0.0).to(tl.float32)
                v_o = tl.load(VC + bhk * W * DV + slot_old * DV + offs_d, mask=md, other=0.0).to(tl.float32)
            s_state += fk_o[:, None] * v_o[None, :]
            z += fk_o
    tl.store(st_ptr, s_state, mask=st_mask)
    if pid_d == 0:
        tl.store(Z + bhs * F + offs_f, z, mask=mf)


@triton.jit
def _decode_window_kernel(
    Q, K, V, G, KC, VC, POS, KS, VS, SPOS, PN, PD, O,
    scale, eps, BH,
    H: tl.constexpr, HK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, W: tl.constexpr, E: tl.constexpr,
    NF: tl.constexpr, ND: tl.constexpr,
    BW: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BNF: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = pid % ND
    pid_bk = pid // ND
    b = pid_bk // HK
    hk = pid_bk % HK
    bhk = pid_bk.to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    md = offs_d < DV
    offs_nf = tl.arange(0, BNF)
    mnf = offs_nf < NF
    if W > 0:  # the window keys are read once for all query heads of the key head
        i = tl.load(POS + b).to(tl.int32)
        offs_w = tl.arange(0, BW)
        offs_dk = tl.arange(0, BDK)
        mdk = offs_dk < DK
        slot_new = i % W
        j_r = i - ((i - offs_w + W) % W)
        ok = (offs_w < W) & (j_r >= 0)
        is_new = offs_w == slot_new
        k_new = tl.load(K + bhk * DK + offs_dk, mask=mdk, other=0.0).to(tl.float32)
        v_new = tl.load(V + bhk * DV + offs_d, mask=md, other=0.0).to(tl.float32)
        kw = tl.load(KC + bhk * W * DK + offs_w[:, None] * DK + offs_dk[None, :], mask=(ok & ~is_new)[:, None] & mdk[None, :], other=0.0).to(tl.float32)
        kw = tl.where(is_new[:, None], k_new[None, :], kw)
        vw = tl.load(VC + bhk * W * DV + offs_w[:, None] * DV + offs_d[None, :], mask=(ok & ~is_new)[:, None] & md[None, :], other=0.0).to(tl.float32)
        vw = tl.where(is_new[:, None], v_new[None, :], vw)
        if E > 0:
            offs_e = tl.arange(0, BE)
            sp = tl.load(SPOS + b * E + offs_e, mask=offs_e < E, other=2147483647)
            seen = (offs_e < E) & (sp <= i - W)
            ks = tl.load(KS + bhk * E * DK + offs_e[:, None] * DK + offs_dk[None, :], mask=seen[:, None] & mdk[None, :], other=0.0).to(tl.float32)
            vs = tl.load(VS + bhk * E * DV + offs_e[:, None] * DV + offs_d[None, :], mask=seen[:, None] & md[None, :], other=0.0).to(tl.float32)

    for r in range(H // HK):
        h = hk * (H // HK) + r
        bh = (b * H + h).to(tl.int64)
        pidx = offs_nf.to(tl.int64) * BH + bh
        num = tl.sum(tl.load(PN + pidx[:, None] * DV + offs_d[None, :], mask=mnf[:, None] & md[None, :], other=0.0), 0)
        den = tl.sum(tl.load(PD + pidx, mask=mnf, other=0.0), 0)
        if W > 0:  # the same arithmetic as _decode_kernel
            q = tl.load(Q + bh * DK + offs_dk, mask=mdk, other=0.0).to(tl.float32)
            g = tl.load(G + h).to(tl.float32)
            sc = tl.sum(q[None, :] * kw, 1) * scale
            sc = tl.where(ok, sc, float("-inf"))
            c = tl.max(sc, 0)
            if E > 0:
                ss = tl.where(seen, tl.sum(q[None, :] * ks, 1) * scale, float("-inf"))
                m = tl.maximum(c, tl.max(ss, 0))
                alpha = tl.exp(c - m)
                p = tl.exp(sc - m) * g
                ps = tl.exp(ss - m) * g
                num = alpha * num + tl.sum(p[:, None] * vw, 0) + tl.sum(ps[:, None] * vs, 0)
                den = alpha * (den + eps) + tl.sum(p, 0) + tl.sum(ps, 0) - eps
            else:
                p = tl.exp(sc - c) * g
                num += tl.sum(p[:, None] * vw, 0)
                den += tl.sum(p, 0)
        tl.store(O + bh * DV + offs_d, (num / (den + eps)).to(O.dtype.element_ty), mask=md)

    if W > 0:  # the new key into its slot, after this program's window read (the other D blocks never read it)
        if pid_d == 0:
            tl.store(KC + bhk * W * DK + slot_new * DK + offs_dk, k_new.to(KC.dtype.element_ty), mask=mdk)
        tl.store(VC + bhk * W * DV + slot_new * DV + offs_d, v_new.to(VC.dtype.element_ty), mask=md)


# --------------------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch options of the decode step; pass another one (``launch=``) to sweep (benchmarks/gpu_kernel_sweep.py,
    benchmarks/gpu_decode_kernel.py). ``split_f="auto"`` (the default) picks the path per call (:meth:`resolve`),
    ``None`` is the fused one-kernel path, an integer the split two-kernel path (see the module docstring)."""

    block_d: int | None = None
    """D columns per program of the fused kernel, or per state-kernel program of the split path; None = the
    measured choice :func:`_block_d` (fused) or :func:`_split_blocks` (split, not yet measured)."""
    num_warps: int = 4
    """Warps per program of the fused kernel, or of the split path's state kernel."""
    split_f: int | None | str = "auto"
    """"auto": :meth:`resolve` chooses. None: the fused kernel. k >= 1: the split path, whose state kernel cuts each state tile into at most ``k``
    F blocks of ``next_power_of_2(ceil(F / k))`` rows (so ``ceil(F / that)`` programs per tile, which is ``k`` when
    F is a multiple of k and a power of two)."""
    window_block_d: int | None = None
    """Split path: D columns per window-kernel program (None: all of D up to 128; the window scores are recomputed
    per D block, so more than one block only pays for D > 128)."""
    window_num_warps: int = 4
    """Split path: warps per window-kernel program."""

    def __post_init__(self):
        if self.split_f != "auto" and self.split_f is not None and (not isinstance(self.split_f, int)
                                                                     or self.split_f < 1):
            raise ValueError(f"split_f must be 'auto', None (fused kernel) or an integer >= 1, got {self.split_f!r}")
        for name in ("block_d", "window_block_d"):
            x = getattr(self, name)
            if x is not None and (x < 1 or x & (x - 1)):
                raise ValueError(f"{name} must be a power of two, got {x}")


    def resolve(self, B: int, H: int, Hs: int, F: int, D: int) -> int | None:
        """The split factor for this call (None: fused). ``"auto"`` takes the split path with one F block when
        B * H >= :data:`SPLIT_FROM_BH` (H200, 2026-12-01, ``benchmarks/gpu_decode_kernel.py``, W 64, 4 sinks, CUDA
        graph: 1.13x the fused kernel at B * H = 2,052 and 1.25x at 8,190 for SmolLM2's heads with F = 128;
        1.37x / 1.53x for D = F = 128; 0.87x at 252, where the second launch costs more than it saves; more F
        blocks were slower everywhere), and also wherever the fused kernel would be wrong or could not launch:
        more than one D block (they race on z) or B * Hs over the grid's 65,535."""
        if self.split_f != "auto":
            return self.split_f
        fused_blocks = triton.cdiv(D, self.block_d or _block_d(F, D))
        if B * H >= SPLIT_FROM_BH or fused_blocks > 1 or B * Hs > 65535:
            return 1
        return None


SPLIT_FROM_BH = 2048
"""Batch x query heads from which ``DecodeLaunch(split_f="auto")`` takes the split path (see :meth:`resolve`)."""
DEFAULT_DECODE_LAUNCH = DecodeLaunch()
FUSED_DECODE_LAUNCH = DecodeLaunch(split_f=None)
SPLIT_DECODE_LAUNCH = DecodeLaunch(split_f=1)
"""The split path with one F block per state tile: the fastest split option on H200 at every size measured."""


class _SeenSignatures:
    """Call signatures (shapes, dtypes, window) whose checks already passed, so that later decode steps skip them;
    bounded (oldest forgotten first), as a long-running server sees ever new batch sizes."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._seen: OrderedDict = OrderedDict()

    def __contains__(self, sig) -> bool:
        return sig in self._seen

    def add(self, sig) -> None:
        self._seen[sig] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


_CHECKED = _SeenSignatures()


def _out_buffer(out: Tensor | None, B: int, H: int, D: int, v: Tensor) -> Tensor:
    """The step's output buffer: ``out`` checked (contiguous, ``v``'s dtype, B * H * D elements) or a new one."""
    if out is None:
        return torch.empty(B, H, 1, D, device=v.device, dtype=v.dtype)
    if out.numel() != B * H * D or out.dtype != v.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {v.dtype} buffer of B * H * D = {B * H * D} elements, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return out


def _block_d(F: int, D: int) -> int:
    """D columns per program: 64 (32 when F > 128). Swept on H200 at B * H = 2048, D = F = 128 (CUDA graph, 4
    warps): BD 64 → 64 us, 32 → 97 us (75 us with 2 warps), 16 → 177 us, 128 (8 warps) → 90 us: narrower blocks
    re-read and re-reduce the window per program and lose more than the added parallelism gains."""
    BF = max(16, triton.next_power_of_2(F))
    return min(max(16, triton.next_power_of_2(D)), 64 if BF <= 128 else 32)


def _split_blocks(F: int, D: int, split_f: int, block_d: int | None = None) -> tuple[int, int]:
    """(BF, BD) of the split path's state kernel: BF = next_power_of_2(ceil(F / split_f)); BD = all of D up to 128
    columns (whole rows: each program streams one contiguous run of the state when D <= 128), halved while the
    tile exceeds 8192 fp32 (32 KiB: 64 registers per thread at 4 warps). A guess from the arithmetic, to be
    measured on GPU."""
    BF = triton.next_power_of_2(triton.cdiv(F, split_f))
    if block_d is not None:
        return BF, block_d
    BD = min(max(16, triton.next_power_of_2(D)), 128)
    while BF * BD > 8192 and BD > 16:
        BD //= 2
    return BF, BD


def hybrid_decode_step(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor | None = None,
    *,
    state: State,
    k_cache: Tensor | None,
    v_cache: Tensor | None,
    fk_cache: Tensor | None,
    pos: Tensor,
    window: int,
    scale: float,
    eps: float = 1e-6,
    out: Tensor | None = None,
    launch: DecodeLaunch | None = None,
    sinks: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Triton decoding step for every batch and head (one launch on the fused path, two on the split path, chosen
    by ``launch.split_f``); updates ``state`` and the ring-buffer caches in place. See the module docstring for the
    cache layout and the two paths.

    Args:
        q [B, H, (1,) d], k [B, Hk, (1,) d], v [B, Hk, (1,) D], fq [B, H, (1,) F], fk [B, Hs, (1,) F]: the new
            token (``q``, ``k``, ``gamma`` may be None when ``window == 0``).
        gamma [H]: window mixing factor.
        state: ``(S [B, Hs, F, D], z [B, Hs, F])`` fp32, contiguous; covers keys ``<= pos - W``.
        k_cache, v_cache, fk_cache: ring buffers ``[B, Hk, W, d]``, ``[B, Hk, W, D]``, ``[B, Hs, W, F]`` (None when
            ``window == 0``); key ``j`` in slot ``j % W``.
        pos [B]: position of the new token; not advanced here.
        window, scale, eps: as in ``hybrid_attention``.
        out: optional contiguous ``[B, H, 1, D]`` (or ``[B, H, D]``) buffer of ``v.dtype`` for the output (saves
            an allocation per step).
        launch: kernel launch options (:class:`DecodeLaunch`; None = :data:`DEFAULT_DECODE_LAUNCH`).
        sinks: optional ``(k_s [B, Hk, E, d], v_s [B, Hk, E, D], sink_pos [B, E])`` attention-sink keys, positions
            in the coordinates of ``pos`` (``naive.NO_SINK`` for an empty slot); read only.

    Returns:
        o [B, H, 1, D] in ``v.dtype`` (``out`` viewed as such when given).

    Raises:
        ValueError: on shapes that do not match the cache layout.

    Host cost: the shape checks run once per call signature (shapes, dtypes, window); inputs that are already
    contiguous are passed as they are (``[B, heads, 1, dim]`` and ``[B, heads, dim]`` share one memory layout).
    """
    launch = launch or DEFAULT_DECODE_LAUNCH
    S, z = state
    xs = (q, k, v, fq, fk)
    if not all(x is None or x.is_contiguous() for x in xs):
        q, k, v, fq, fk = (None if x is None else x.contiguous() for x in xs)
    sig = (window, None if q is None else q.shape, None if k is None else k.shape, v.shape, fq.shape, fk.shape,
           v.dtype, S.shape, S.dtype, z.shape, z.dtype, pos.shape, None if gamma is None else gamma.shape,
           None if k_cache is None else (k_cache.shape, v_cache.shape, fk_cache.shape))
    if sig not in _CHECKED or not (S.is_contiguous() and z.is_contiguous()) or (
        window > 0 and not (k_cache.is_contiguous() and v_cache.is_contiguous() and fk_cache.is_contiguous())
    ):
        _check_decode(*(_squeeze_t(x) for x in xs), gamma, state, k_cache, v_cache, fk_cache, pos, window)
        _CHECKED.add(sig)
    B, H, F = fq.shape[0], fq.shape[1], fq.shape[-1]
    Hk, D = v.shape[1], v.shape[-1]
    Hs = fk.shape[1]
    out = _out_buffer(out, B, H, D, v)
    BF = max(16, triton.next_power_of_2(F))
    BD = launch.block_d or _block_d(F, D)
    if window > 0:
        DK = q.shape[-1]
        qq, kk, gg, kc, vc, fc = q, k, gamma if gamma.is_contiguous() else gamma.contiguous(), k_cache, v_cache, fk_cache
    else:
        DK = 16
        qq, kk, gg, kc, vc, fc = fq, fk, z, S, S, S
    if sinks is not None and window <= 0:
        raise ValueError("sinks need window > 0 (they join the window's softmax terms)")
    ks, vs, spos, E = sink_arguments(sinks, B, Hk, DK, D, S)
    pos = pos if pos.is_contiguous() else pos.contiguous()
    split = launch.resolve(B, H, Hs, F, D)
    if split is not None:
        _split_step(qq, kk, v, fq, fk, gg, kc, vc, fc, S, z, pos, ks, vs, spos, out, scale, eps,
                    dataclasses.replace(launch, split_f=split),
                    B=B, H=H, Hk=Hk, Hs=Hs, DK=DK, D=D, F=F, W=window, E=E)
        return out if out.dim() == 4 else out.view(B, H, 1, D)
    grid = (triton.cdiv(D, BD), B * Hs)
    _decode_kernel[grid](
        qq, kk, v, fq, fk, gg, kc, vc, fc, S, z, pos, ks, vs, spos, out,
        float(scale), float(eps),
        H=H, HK=Hk, HS=Hs, DK=DK, DV=D, F=F, W=window, E=E,
        BW=max(16, triton.next_power_of_2(max(window, 1))), BDK=max(16, triton.next_power_of_2(DK)), BD=BD, BF=BF,
        BE=max(16, triton.next_power_of_2(max(E, 1))), num_warps=launch.num_warps,
    )
    return out if out.dim() == 4 else out.view(B, H, 1, D)


def window_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor,
    *,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    window: int,
    scale: float,
    eps: float = 1e-6,
    out: Tensor | None = None,
    sinks: tuple[Tensor, Tensor, Tensor] | None = None,
    num_warps: int = 4,
) -> Tensor:
    """Triton decoding step of a layer's exact part alone (a window-only layer: no state, no phi(k) ring): the
    split path's window kernel with no state partials, one program per (batch, key head) (and D block of up to
    128 columns); reads the window and the sinks once for all query heads of the key head and writes the new key
    and value into slot ``pos % W``. The output is ``hybrid_decode_step``'s with a zero state:
    ``g * sum exp(s - c) v / (g * sum exp(s - c) + eps)`` over the window and the sinks that left it.

    Args: as :func:`hybrid_decode_step` without the feature-map inputs, the state and ``fk_cache``; ``window > 0``.
    Returns o [B, H, 1, D] in ``v.dtype`` (``out`` viewed as such when given).
    """
    xs = (q, k, v)
    if not all(x.is_contiguous() for x in xs):
        q, k, v = (x.contiguous() for x in xs)
    sig = ("window-only", window, q.shape, k.shape, v.shape, v.dtype, pos.shape, gamma.shape, k_cache.shape,
           v_cache.shape)
    if sig not in _CHECKED or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        _check_window_decode(_squeeze_t(q), _squeeze_t(k), _squeeze_t(v), gamma, k_cache, v_cache, pos, window)
        _CHECKED.add(sig)
    B, H, DK = q.shape[0], q.shape[1], q.shape[-1]
    Hk, D = v.shape[1], v.shape[-1]
    out = _out_buffer(out, B, H, D, v)
    ks, vs, spos, E = sink_arguments(sinks, B, Hk, DK, D, k_cache)
    pos = pos if pos.is_contiguous() else pos.contiguous()
    gamma = gamma if gamma.is_contiguous() else gamma.contiguous()
    BDW = min(max(16, triton.next_power_of_2(D)), 128)
    NDW = triton.cdiv(D, BDW)
    _decode_window_kernel[(B * Hk * NDW,)](
        q, k, v, gamma, k_cache, v_cache, pos, ks, vs, spos, gamma, gamma, out,  # NF = 0: PN / PD (fp32) unread
        float(scale), float(eps), B * H,
        H=H, HK=Hk, DK=DK, DV=D, W=window, E=E, NF=0, ND=NDW,
        BW=max(16, triton.next_power_of_2(window)), BDK=max(16, triton.next_power_of_2(DK)), BD=BDW,
        BE=max(2, triton.next_power_of_2(max(E, 1))), BNF=2, num_warps=num_warps,
    )
    return out if out.dim() == 4 else out.view(B, H, 1, D)


def _split_step(q, k, v, fq, fk, gamma, kc, vc, fc, S, z, pos, ks, vs, spos, out, scale, eps, launch, *,
                B, H, Hk, Hs, DK, D, F, W, E):
    """The split path: state kernel (partials of fq . S and fq . z per F block and query head, state update,
    fk slot), then window kernel (scores once per key head, combines the partials, writes o and the k / v slots).
    Scratch: ``NF * B * H * (D + 1)`` fp32 from the caching allocator (shape-dependent only: fine in a CUDA graph)."""
    BF, BD = _split_blocks(F, D, launch.split_f, launch.block_d)
    NF, ND = triton.cdiv(F, BF), triton.cdiv(D, BD)
    BH = B * H
    part = torch.empty(NF * BH * (D + 1), device=v.device, dtype=torch.float32)
    pn, pd = part[: NF * BH * D], part[NF * BH * D :]
    _decode_state_kernel[(B * Hs * ND * NF,)](
        v, fq, fk, vc, fc, S, z, pos, pn, pd, BH,
        H=H, HK=Hk, HS=Hs, DV=D, F=F, W=W, NF=NF, ND=ND, BF=BF, BD=BD, num_warps=launch.num_warps,
    )
    BDW = launch.window_block_d or min(max(16, triton.next_power_of_2(D)), 128)
    NDW = triton.cdiv(D, BDW)
    _decode_window_kernel[(B * Hk * NDW,)](
        q, k, v, gamma, kc, vc, pos, ks, vs, spos, pn, pd, out,
        float(scale), float(eps), BH,
        H=H, HK=Hk, DK=DK, DV=D, W=W, E=E, NF=NF, ND=NDW,
        BW=max(16, triton.next_power_of_2(max(W, 1))), BDK=max(16, triton.next_power_of_2(DK)), BD=BDW,
        BE=max(2, triton.next_power_of_2(max(E, 1))), BNF=max(2, triton.next_power_of_2(NF)),
        num_warps=launch.window_num_warps,
    )
