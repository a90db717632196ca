"""Fused Triton kernels for the Hedgehog and BASED (Taylor) feature maps, forward and backward.

Origin: written for linearize from the definitions in ``naive.py`` (no code taken from other projects).

Math (one head ``h``, one row ``x`` of ``d`` values; see ``naive.py``):

    Hedgehog  y = x W + b  (p values)   phi = [softmax(y), softmax(-y)]                           F = 2 p
    Taylor    y = x W      (r values)   phi = [1, y / r^(1/4), c_ij y_i y_j (i <= j, triu order)]   F = 1 + r + r(r+1)/2

Backward, with g = dL/dphi split like phi (all in fp32):

    Hedgehog  dy = p+ * (g+ - sum(g+ p+)) - p- * (g- - sum(g- p-))        (p+- = softmax(+-y), the two halves)
    Taylor    dy = g_lin / r^(1/4) + sum_{i <= j} c_ij g_ij (y_j e_i + y_i e_j)
    both      dx = dy W^T,   dW = sum_rows x^T dy,   db = sum_rows dy

Design: grid ``(B * h, NT)``; program ``(bh, t)`` walks ``NB`` consecutive blocks of ``BT`` rows of one (batch, head).
With one row per sequence (``T = 1``: the decode step's one token) the rows of a head are its ``B`` sequences
instead, grid ``(h, NT)``, so that a tile holds ``BT`` sequences rather than one valid row (``_rows``). It loads the
head's ``W`` (and ``b``) once, then for each block loads the ``x`` tile, computes ``y = x W`` with
``tl.dot`` (fp32 accumulation; exact fp32 ``ieee`` products for fp32 inputs, tensor cores for bf16 / fp16), applies
the map in fp32 registers and stores ``phi`` once in ``x.dtype``. Nothing but ``phi`` touches HBM: ``y`` and the
softmax / pair products never leave the chip, so the forward moves ``(d + F) * e`` bytes per row (e = element size)
plus ``W``. ``NB`` trades parallelism for fewer reloads of ``W`` (forward) and fewer ``dW`` partials (backward): it is
the largest power of two (at most 512 rows per program forward, 2048 backward) that still leaves 1024 (forward) /
512 (backward) programs (``launch_config``, which also holds the block sizes and warp counts).

Taylor pair products: the ``r (r+1) / 2`` products of a row are produced as ``r`` rows of the upper triangle. Step
``i`` extracts column ``y_i`` with a masked row-sum (``BT * r`` work, no gather), multiplies it with the whole ``y``
tile and stores the ``j >= i`` part at its packed offset ``1 + r + i r - i (i - 1) / 2 + (j - i)``. The ``r`` masked
stores of one block cover one contiguous ``BT * F`` region, which L2 merges before it goes to HBM. The backward
walks the same ``r`` steps, loading ``g`` the same way. F is not a power of two: everything is indexed in
``r``-wide tiles with masks, no padded F-wide tile exists.

Backward saves only ``x``, ``W`` (cast to ``x.dtype``) and ``b``; ``y`` and ``phi`` are recomputed (one extra
``x W`` per block, cheap next to reading ``dphi``). ``dy`` is rounded to ``x.dtype`` before the two matmuls, as the
PyTorch reference's autograd does. Parameter gradients: each program accumulates its ``x^T dy`` (and ``sum dy``) in
fp32 registers over its ``NB`` blocks and writes one fp32 partial ``[d, p]`` (and ``[p]``) to a buffer
``[n_t_programs * B, h, d, p]``; PyTorch sums the partials. This is deterministic (no atomics, whose contention would
serialise every program of a head on the same ``d * p`` addresses); its cost is ``8 d p`` bytes per program
(write + read). At the default grid's large sizes (2048 rows per program) that is ~5% of the backward's
``2 (2 d + F)`` bytes per row for Hedgehog at d = 128 and ~1% for Taylor; at small ``B h T`` (e.g. B h = 32,
T = 1k, where the programs are kept at 512 for parallelism) the partials can outweigh the main traffic, but such
calls are launch-bound anyway. ``linearize.bench.feature_maps`` reports them (``bwd_partial_MB``).

Supported: ``d, p (r) in {16, 32, 64, 128}`` (power-of-two tiles, ``tl.dot`` needs >= 16), any ``T`` (the last block
is masked), fp32 / bf16 / fp16 ``x``; non-contiguous inputs are made contiguous. Other shapes raise ``ValueError``
(the dispatcher's ``backend="auto"`` falls back to the PyTorch reference for them). On CPU tensors (Triton
interpreter, ``TRITON_INTERPRET=1``) bf16 / fp16 operands are upcast to fp32 before ``tl.dot`` (the interpreter's
bf16 dot is wrong); the products are exact either way. Not differentiable twice.

Difference from the reference for bf16 / fp16 inputs: the reference rounds ``y = x W (+ b)`` to ``x.dtype`` before
the fp32 map; the kernel keeps the fp32 accumulator (more accurate, relative differences ~1e-3). fp32 inputs agree
to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.feature_maps.naive import (
    FLOAT_DTYPES,
    based_feature_dim,
    based_features_torch,
    check_projection,
    hedgehog_features_torch,
)

SUPPORTED_DIMS = (16, 32, 64, 128)

# --------------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. UPCAST (CPU interpreter only, whose bf16 ``tl.dot`` is wrong): multiply in
    fp32, which is exact for bf16 / fp16 operands, so it reproduces the tensor-core result up to summation order."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _hedgehog_halves(x, w, b, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """y = x W (+ b) in fp32 -> (softmax(y), softmax(-y)) over the feature dim; max(-y) = -min(y)."""
    y = _mm(x, w, PREC, UPCAST)
    if HAS_BIAS:
        y += b[None, :]
    e_pos = tl.exp(y - tl.max(y, 1)[:, None])
    e_neg = tl.exp(tl.min(y, 1)[:, None] - y)
    return e_pos / tl.sum(e_pos, 1)[:, None], e_neg / tl.sum(e_neg, 1)[:, None]


@triton.jit
def _hedgehog_fwd_kernel(
    X, W, BIAS, PHI,
    T, XG, OG,
    H: tl.constexpr, D: tl.constexpr, P: tl.constexpr, XR: tl.constexpr, OR: tl.constexpr,
    BT: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    h = bh % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, P)
    w = tl.load(W + h * D * P + offs_d[:, None] * P + offs_p[None, :])
    if HAS_BIAS:
        b = tl.load(BIAS + h * P + offs_p).to(tl.float32)
    else:
        b = tl.zeros([P], tl.float32)
    x_base = X + bh * XG
    o_base = PHI + bh * OG
    t_beg = pid_t * (NB * BT)
    t_end = tl.minimum(T, t_beg + NB * BT)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + offs_t
        mt = t < T
        x = tl.load(x_base + t[:, None] * XR + offs_d[None, :], mask=mt[:, None], other=0.0)
        phi_pos, phi_neg = _hedgehog_halves(x, w, b, HAS_BIAS, PREC, UPCAST)
        o_ptr = o_base + t[:, None] * OR + offs_p[None, :]
        tl.store(o_ptr, phi_pos.to(PHI.dtype.element_ty), mask=mt[:, None])
        tl.store(o_ptr + P, phi_neg.to(PHI.dtype.element_ty), mask=mt[:, None])


@triton.jit
def _hedgehog_bwd_kernel(
    X, W, BIAS, DPHI,
    DX, DW_PART, DB_PART,
    T, XG, OG,
    H: tl.constexpr, D: tl.constexpr, P: tl.constexpr, XR: tl.constexpr, OR: tl.constexpr,
    BT: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """DW_PART [n_t_programs, B*H, D, P] / DB_PART [n_t_programs, B*H, P]: fp32 partial sums, one per program."""
    bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    h = bh % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, P)
    w = tl.load(W + h * D * P + offs_d[:, None] * P + offs_p[None, :])
    if HAS_BIAS:
        b = tl.load(BIAS + h * P + offs_p).to(tl.float32)
    else:
        b = tl.zeros([P], tl.float32)
    dw = tl.zeros([D, P], tl.float32)
    db = tl.zeros([P], tl.float32)
    x_base = X + bh * XG
    g_base = DPHI + bh * OG
    t_beg = pid_t * (NB * BT)
    t_end = tl.minimum(T, t_beg + NB * BT)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + offs_t
        mt = t < T
        x = tl.load(x_base + t[:, None] * XR + offs_d[None, :], mask=mt[:, None], other=0.0)
        phi_pos, phi_neg = _hedgehog_halves(x, w, b, HAS_BIAS, PREC, UPCAST)
        g_ptr = g_base + t[:, None] * OR + offs_p[None, :]
        g_pos = tl.load(g_ptr, mask=mt[:, None], other=0.0).to(tl.float32)
        g_neg = tl.load(g_ptr + P, mask=mt[:, None], other=0.0).to(tl.float32)
        dy = phi_pos * (g_pos - tl.sum(g_pos * phi_pos, 1)[:, None])
        dy -= phi_neg * (g_neg - tl.sum(g_neg * phi_neg, 1)[:, None])
        dy_lo = dy.to(w.dtype)  # what the reference's autograd hands its x.dtype matmuls
        if NEED_DX:
            dx = _mm(dy_lo, tl.trans(w), PREC, UPCAST)
            tl.store(DX + bh * XG + t[:, None] * XR + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mt[:, None])
        if NEED_DW:
            dw += _mm(tl.trans(x), dy_lo, PREC, UPCAST)
            db += tl.sum(dy, 0)
    if NEED_DW:
        part = pid_t.to(tl.int64) * tl.num_programs(0) + bh
        tl.store(DW_PART + part * D * P + offs_d[:, None] * P + offs_p[None, :], dw)
        if HAS_BIAS:
            tl.store(DB_PART + part * P + offs_p, db)


@triton.jit
def _based_fwd_kernel(
    X, W, PHI,
    T, XG, OG, lin_scale, c_diag, c_off,
    H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, F: tl.constexpr, XR: tl.constexpr, OR: tl.constexpr,
    BT: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    h = bh % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R)
    w = tl.load(W + h * D * R + offs_d[:, None] * R + offs_r[None, :])
    x_base = X + bh * XG
    o_base = PHI + bh * OG
    t_beg = pid_t * (NB * BT)
    t_end = tl.minimum(T, t_beg + NB * BT)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + offs_t
        mt = t < T
        x = tl.load(x_base + t[:, None] * XR + offs_d[None, :], mask=mt[:, None], other=0.0)
        y = _mm(x, w, PREC, UPCAST)  # [BT, R] fp32
        row = o_base + t[:, None] * OR  # [BT, 1] row pointers
        ones = tl.full([BT, 1], 1.0, tl.float32)
        tl.store(row, ones.to(PHI.dtype.element_ty), mask=mt[:, None])
        tl.store(row + 1 + offs_r[None, :], (y * lin_scale).to(PHI.dtype.element_ty), mask=mt[:, None])
        for i in range(R):
            off = 1 + R + (i * (2 * R + 1 - i)) // 2  # packed offset of pair (i, i): 1 + r + sum_{k<i} (r - k)
            sel = offs_r[None, :] == i
            y_i = tl.sum(tl.where(sel, y, 0.0), 1)  # column i of y
            coef = tl.where(sel, c_diag, c_off)
            val = y_i[:, None] * y * coef
            keep = mt[:, None] & (offs_r[None, :] >= i)
            tl.store(row + off + offs_r[None, :] - i, val.to(PHI.dtype.element_ty), mask=keep)


@triton.jit
def _based_bwd_kernel(
    X, W, DPHI,
    DX, DW_PART,
    T, XG, OG, lin_scale, c_diag, c_off,
    H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, F: tl.constexpr, XR: tl.constexpr, OR: tl.constexpr,
    BT: tl.constexpr, NB: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    h = bh % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R)
    w = tl.load(W + h * D * R + offs_d[:, None] * R + offs_r[None, :])
    dw = tl.zeros([D, R], tl.float32)
    x_base = X + bh * XG
    g_base = DPHI + bh * OG
    t_beg = pid_t * (NB * BT)
    t_end = tl.minimum(T, t_beg + NB * BT)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + offs_t
        mt = t < T
        x = tl.load(x_base + t[:, None] * XR + offs_d[None, :], mask=mt[:, None], other=0.0)
        y = _mm(x, w, PREC, UPCAST)  # [BT, R] fp32
        row = g_base + t[:, None] * OR
        dy = tl.load(row + 1 + offs_r[None, :], mask=mt[:, None], other=0.0).to(tl.float32) * lin_scale
        for i in range(R):
            off = 1 + R + (i * (2 * R + 1 - i)) // 2
            sel = offs_r[None, :] == i
            keep = mt[:, None] & (offs_r[None, :] >= i)
            g = tl.load(row + off + offs_r[None, :] - i, mask=keep, other=0.0).to(tl.float32)
            gc = g * tl.where(sel, c_diag, c_off)  # c_ij g_ij for j >= i, zero for j < i
            y_i = tl.sum(tl.where(sel, y, 0.0), 1)
            dy += y_i[:, None] * gc  # d/dy_j of c_ij y_i y_j
            s_i = tl.sum(gc * y, 1)  # d/dy_i, summed over j
            dy += tl.where(sel, s_i[:, None], 0.0)
        dy_lo = dy.to(w.dtype)
        if NEED_DX:
            dx = _mm(dy_lo, tl.trans(w), PREC, UPCAST)
            tl.store(DX + bh * XG + t[:, None] * XR + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mt[:, None])
        if NEED_DW:
            dw += _mm(tl.trans(x), dy_lo, PREC, UPCAST)
    if NEED_DW:
        part = pid_t.to(tl.int64) * tl.num_programs(0) + bh
        tl.store(DW_PART + part * D * R + offs_d[:, None] * R + offs_r[None, :], dw)


# --------------------------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------------------------

# Programs to aim for (132 SMs on an H200): the forward wants ~8 per SM to hide load latency; the backward settles for
# ~4, since every program adds an fp32 dW partial (8 d p bytes of traffic) and its 8-warp programs fit 1-2 per SM.
_TARGET_FWD = 1024
_TARGET_BWD = 512
_MAX_ROWS_FWD = 512  # rows per program at most (NB * BT)
_MAX_ROWS_BWD = 2048


def _dot_cfg(x: Tensor) -> dict:
    """fp32 inputs are the reference path: exact fp32 products (``ieee``, no tf32); bf16 / fp16 ignore PREC. CPU
    tensors run under the Triton interpreter, whose bf16 ``tl.dot`` is wrong: there the operands are upcast."""
    upcast = not x.is_cuda and x.dtype != torch.float32
    return dict(PREC="ieee" if x.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def launch_config(
    kind: str, backward: bool, D: int, P: int, dtype: torch.dtype, T: int, BH: int,
    block_t: int | None = None, blocks_per_program: int | None = None,
) -> tuple[int, int, int, int]:
    """(BT rows per block, NB blocks per program, NT programs along T, num_warps) for one launch.

    Defaults for bf16 / fp16, chosen from ``ptxas -v`` on sm_90a (Triton 3.9; registers per thread, none spill):

        hedgehog fwd   width = max(d, p) <= 64: BT 64, 8 warps (110)     128: BT 32, 8 warps (104)
        hedgehog bwd   <= 64: BT 32, 8 warps (128)                        128: BT 32, 8 warps (228)
        taylor fwd     r <= 32: BT 64, 4 warps (72) / 8 warps at d = 128 (64)     r >= 64: BT 32, 8 warps (<= 152)
        taylor bwd     r = 16: BT 64, 8 warps (138 at d = 64, 188 at d = 128)     r >= 32: BT 32, 8 warps (<= 255)

    They are not tuned on a GPU (``block_t`` / ``blocks_per_program`` override them). fp32 inputs (the reference /
    test path; ``ieee`` products take more registers and shared memory) use half the rows, at least 16.
    """
    if kind == "hedgehog":
        width = max(D, P)
        bt, warps = (32, 8) if backward or width >= 128 else (64, 8)
    else:
        if backward:
            bt, warps = (64, 8) if P <= 16 else (32, 8)
        else:
            bt, warps = (64, 4 if D <= 64 else 8) if P <= 32 else (32, 8)
    if dtype == torch.float32:
        bt = max(16, bt // 2)
    if block_t is not None:
        if block_t < 16 or block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
        bt = block_t
    n_blocks = triton.cdiv(T, bt)
    if blocks_per_program is not None:
        if blocks_per_program < 1:
            raise ValueError(f"blocks_per_program must be >= 1, got {blocks_per_program}")
        nb = blocks_per_program
    else:  # largest power of two <= max_nb (and <= n_blocks) that still leaves >= target programs
        max_rows, target = (_MAX_ROWS_BWD, _TARGET_BWD) if backward else (_MAX_ROWS_FWD, _TARGET_FWD)
        max_nb = max(1, max_rows // bt)
        nb = 1
        while nb * 2 <= min(max_nb, n_blocks) and triton.cdiv(n_blocks, nb * 2) * BH >= target:
            nb *= 2
    while triton.cdiv(n_blocks, nb) > 65535:  # the T programs are grid axis 1 (at most 65535)
        nb *= 2
    return bt, nb, triton.cdiv(n_blocks, nb), warps


def check_fused(x: Tensor, weight: Tensor, bias: Tensor | None, what: str) -> tuple[int, int, int, int, int]:
    """Shape / dtype / device checks of the fused path (after the reference's shape checks).

    Raises:
        ValueError: unsupported head or projection size, dtype, or mismatched devices.
    """
    B, h, T, d, p = check_projection(x, weight, bias, what)
    if d not in SUPPORTED_DIMS or p not in SUPPORTED_DIMS:
        raise ValueError(
            f"{what}: the fused Triton kernel supports head dim d and projection dim in {SUPPORTED_DIMS}, got d={d}, "
            f"p={p}; use backend='torch' for other sizes"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: x must be float32, bfloat16 or float16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device}, x on {x.device}")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{what}: {name} must be a floating tensor, got {t.dtype}")
    return B, h, T, d, p


def fused_supported(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether the fused kernels accept these inputs (used by ``backend="auto"`` to fall back to PyTorch)."""
    return (
        x.dim() == 4 and weight.dim() == 3 and x.shape[-1] in SUPPORTED_DIMS and weight.shape[-1] in SUPPORTED_DIMS
        and x.dtype in FLOAT_DTYPES and weight.device == x.device and (bias is None or bias.device == x.device)
    )


def _partial_sum(part: Tensor, B: int, H: int) -> Tensor:
    """[n_t_programs, B*H, ...] fp32 partials -> [H, ...] (summed over programs and batch; B = 1 where a group is a
    whole head, see ``_rows``)."""
    return part.view(-1, H, *part.shape[2:]).sum(0) if B * part.shape[0] > 1 else part.view(H, *part.shape[2:])


# --------------------------------------------------------------------------------------------------------------------
# launchers (contiguous inputs, weight already in x.dtype)
# --------------------------------------------------------------------------------------------------------------------


def _rows(x: Tensor, F: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """How a launch walks contiguous ``x [B, H, T, D]`` and its ``F``-wide outputs: (G groups = grid axis 0, rows per
    group, strides (x's group, output's group, x's row, output's row) in elements). A group is one (batch, head)
    and its T rows; with one row per sequence (T = 1, the decode step) a group is one head and its B sequences, so
    that a program loads its head's W once for a tile of sequences instead of once per one-row, mostly masked tile."""
    B, H, T, D = x.shape
    if T == 1 and B > 1:
        return H, B, (D, F, H * D, H * F)
    return B * H, T, (T * D, T * F, D, F)


def hedgehog_fwd(x: Tensor, w: Tensor, b: Tensor | None, *, block_t=None, blocks_per_program=None) -> Tensor:
    B, H, T, D = x.shape
    P = w.shape[-1]
    phi = torch.empty(B, H, T, 2 * P, device=x.device, dtype=x.dtype)
    G, rows, (xg, og, xr, orow) = _rows(x, 2 * P)
    BT, NB, NT, warps = launch_config("hedgehog", False, D, P, x.dtype, rows, G, block_t, blocks_per_program)
    _hedgehog_fwd_kernel[(G, NT)](
        x, w, b if b is not None else w, phi, rows, xg, og,
        H=H, D=D, P=P, XR=xr, OR=orow, BT=BT, NB=NB, HAS_BIAS=b is not None, **_dot_cfg(x), num_warps=warps,
    )
    return phi


def hedgehog_bwd(x, w, b, dphi, *, need_dx=True, need_dw=True, block_t=None, blocks_per_program=None):
    """Returns (dx in x.dtype or None, dW [H, D, P] fp32 or None, db [H, P] fp32 or None)."""
    B, H, T, D = x.shape
    P = w.shape[-1]
    G, rows, (xg, og, xr, orow) = _rows(x, 2 * P)
    BT, NB, NT, warps = launch_config("hedgehog", True, D, P, x.dtype, rows, G, block_t, blocks_per_program)
    f32 = torch.float32
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dw_part = torch.empty(NT, G, D, P, device=x.device, dtype=f32) if need_dw else None
    db_part = torch.empty(NT, G, P, device=x.device, dtype=f32) if need_dw and b is not None else None
    _hedgehog_bwd_kernel[(G, NT)](
        x, w, b if b is not None else w, dphi,
        dx if need_dx else x, dw_part if need_dw else x, db_part if db_part is not None else x,
        rows, xg, og, H=H, D=D, P=P, XR=xr, OR=orow, BT=BT, NB=NB, HAS_BIAS=b is not None, NEED_DX=need_dx,
        NEED_DW=need_dw, **_dot_cfg(x), num_warps=warps,
    )
    dw = _partial_sum(dw_part, G // H, H) if need_dw else None
    db = _partial_sum(db_part, G // H, H) if db_part is not None else None
    return dx, dw, db


def _based_consts(R: int) -> tuple[float, float, float]:
    return R**-0.25, 2.0**-0.5 / R**0.5, 1.0 / R**0.5


def based_fwd(x: Tensor, w: Tensor, *, block_t=None, blocks_per_program=None) -> Tensor:
    B, H, T, D = x.shape
    R = w.shape[-1]
    F = based_feature_dim(R)
    phi = torch.empty(B, H, T, F, device=x.device, dtype=x.dtype)
    G, rows, (xg, og, xr, orow) = _rows(x, F)
    BT, NB, NT, warps = launch_config("taylor", False, D, R, x.dtype, rows, G, block_t, blocks_per_program)
    _based_fwd_kernel[(G, NT)](
        x, w, phi, rows, xg, og, *_based_consts(R),
        H=H, D=D, R=R, F=F, XR=xr, OR=orow, BT=BT, NB=NB, **_dot_cfg(x), num_warps=warps,
    )
    return phi


def based_bwd(x, w, dphi, *, need_dx=True, need_dw=True, block_t=None, blocks_per_program=None):
    """Returns (dx in x.dtype or None, dW [H, D, R] fp32 or None)."""
    B, H, T, D = x.shape
    R = w.shape[-1]
    F = based_feature_dim(R)
    G, rows, (xg, og, xr, orow) = _rows(x, F)
    BT, NB, NT, warps = launch_config("taylor", True, D, R, x.dtype, rows, G, block_t, blocks_per_program)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dw_part = torch.empty(NT, G, D, R, device=x.device, dtype=torch.float32) if need_dw else None
    _based_bwd_kernel[(G, NT)](
        x, w, dphi, dx if need_dx else x, dw_part if need_dw else x, rows, xg, og, *_based_consts(R),
        H=H, D=D, R=R, F=F, XR=xr, OR=orow, BT=BT, NB=NB, NEED_DX=need_dx, NEED_DW=need_dw, **_dot_cfg(x),
        num_warps=warps,
    )
    dw = _partial_sum(dw_part, G // H, H) if need_dw else None
    return dx, dw


# --------------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------------


def _c(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


class HedgehogFunction(torch.autograd.Function):
    """(x, weight, bias) -> phi. Saves x, the weight cast to x.dtype and the bias; recomputes y in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, block_t, blocks_per_program):
        x = _c(x)
        w = _c(weight.to(x.dtype))
        b = _c(bias)
        phi = hedgehog_fwd(x, w, b, block_t=block_t, blocks_per_program=blocks_per_program)
        ctx.save_for_backward(x, w, b)
        ctx.cfg = (block_t, blocks_per_program, weight.dtype)
        return phi

    @staticmethod
    def backward(ctx, dphi):
        x, w, b = ctx.saved_tensors
        block_t, nb, w_dtype = ctx.cfg
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (b is not None and ctx.needs_input_grad[2])
        if not (need_dx or need_dw):
            return None, None, None, None, None
        dx, dw, db = hedgehog_bwd(
            x, w, b, _c(dphi), need_dx=need_dx, need_dw=need_dw, block_t=block_t, blocks_per_program=nb
        )
        dw = dw.to(w_dtype) if dw is not None and ctx.needs_input_grad[1] else None
        db = db.to(b.dtype) if db is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


class TaylorFunction(torch.autograd.Function):
    """(x, weight) -> phi. Saves x and the weight cast to x.dtype; recomputes y in the backward."""

    @staticmethod
    def forward(ctx, x, weight, block_t, blocks_per_program):
        x = _c(x)
        w = _c(weight.to(x.dtype))
        phi = based_fwd(x, w, block_t=block_t, blocks_per_program=blocks_per_program)
        ctx.save_for_backward(x, w)
        ctx.cfg = (block_t, blocks_per_program, weight.dtype)
        return phi

    @staticmethod
    def backward(ctx, dphi):
        x, w = ctx.saved_tensors
        block_t, nb, w_dtype = ctx.cfg
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None
        dx, dw = based_bwd(x, w, _c(dphi), need_dx=need_dx, need_dw=need_dw, block_t=block_t, blocks_per_program=nb)
        return dx, (dw.to(w_dtype) if dw is not None else None), None, None


# --------------------------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------------------------


def hedgehog_features_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    block_t: int | None = None,
    blocks_per_program: int | None = None,
) -> Tensor:
    """Fused Hedgehog features ``[softmax(x W + b), softmax(-(x W + b))]``; same semantics as
    ``naive.hedgehog_features_torch``.

    Args:
        x: ``[B, h, T, d]`` fp32 / bf16 / fp16, ``d in {16, 32, 64, 128}``.
        weight: ``[h, d, p]``, ``p in {16, 32, 64, 128}`` (cast to ``x.dtype`` for the matmul; its gradient comes
            back in its own dtype).
        bias: ``[h, p]`` or None (added in fp32).
        block_t: rows per block (power of two >= 16); default from ``launch_config``.
        blocks_per_program: blocks walked by one program; default from ``launch_config``.

    Returns:
        ``phi [B, h, T, 2 p]`` in ``x.dtype``; differentiable w.r.t. x, weight and bias.

    Raises:
        ValueError: on inconsistent shapes or unsupported sizes / dtypes.
    """
    B, h, T, _, _ = check_fused(x, weight, bias, "hedgehog")
    if B * h * T == 0:  # nothing to launch
        return hedgehog_features_torch(x, weight, bias)
    return HedgehogFunction.apply(x, weight, bias, block_t, blocks_per_program)


def based_features_triton(
    x: Tensor,
    weight: Tensor,
    *,
    block_t: int | None = None,
    blocks_per_program: int | None = None,
) -> Tensor:
    """Fused Taylor / BASED features ``[1, y / r^(1/4), c_ij y_i y_j]`` with ``y = x W``; same semantics as
    ``naive.based_features_torch``.

    Args:
        x: ``[B, h, T, d]`` fp32 / bf16 / fp16, ``d in {16, 32, 64, 128}``.
        weight: ``[h, d, r]``, ``r in {16, 32, 64, 128}``.
        block_t, blocks_per_program: as for ``hedgehog_features_triton``.

    Returns:
        ``phi [B, h, T, 1 + r + r (r + 1) / 2]`` in ``x.dtype``; differentiable w.r.t. x and weight.

    Raises:
        ValueError: on inconsistent shapes or unsupported sizes / dtypes.
    """
    B, h, T, _, _ = check_fused(x, weight, None, "taylor")
    if B * h * T == 0:  # nothing to launch
        return based_features_torch(x, weight)
    return TaylorFunction.apply(x, weight, block_t, blocks_per_program)


__all__ = [
    "HedgehogFunction",
    "SUPPORTED_DIMS",
    "TaylorFunction",
    "check_fused",
    "fused_supported",
    "hedgehog_bwd",
    "hedgehog_features_triton",
    "hedgehog_fwd",
    "based_bwd",
    "based_features_triton",
    "based_fwd",
]
