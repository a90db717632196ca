"""Fused Triton mean squared error with its gradient: one pass reads ``o`` and ``target`` once (in their own
dtypes), writes the per-block sums of squares and, when ``o`` needs a gradient, ``d loss / d o = 2 (o - t) / N`` in
``o.dtype`` for the backward.

The PyTorch form (``naive.py``) is ~10 full-size passes per call: both fp32 casts, the difference, the square and,
in the backward, the square's and the casts' gradients. For attention transfer on a 7-8B model that is ~10 GB of
traffic per layer and step, more than the attention kernels themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.kernels.mse.naive import check_pair

BLOCK = 4096


@triton.jit
def _mse_kernel(O, T, G, PART, N, inv_n2, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    o = tl.load(O + offs, mask=m, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=m, other=0.0).to(tl.float32)
    d = o - t
    tl.store(PART + pid, tl.sum(d * d, 0))
    if WRITE_GRAD:
        tl.store(G + offs, (d * inv_n2).to(G.dtype.element_ty), mask=m)


class _FusedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o: Tensor, target: Tensor) -> Tensor:
        o_, t_ = o.contiguous().view(-1), target.contiguous().view(-1)
        n = o_.numel()
        grid = triton.cdiv(n, BLOCK)
        part = torch.empty(grid, device=o.device, dtype=torch.float32)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g = torch.empty_like(o_) if need else part
        _mse_kernel[(grid,)](o_, t_, g, part, n, 2.0 / n, WRITE_GRAD=need, BLOCK=BLOCK, num_warps=8)
        ctx.shape = o.shape
        if need:
            ctx.save_for_backward(g)
        return part.double().sum().div(n).float()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (g,) = ctx.saved_tensors
        go = (g * grad_out.to(g.dtype)).view(ctx.shape)
        do = go if ctx.needs_input_grad[0] else None
        dt = -go if ctx.needs_input_grad[1] else None
        return do, dt


def mse_triton(o: Tensor, target: Tensor) -> Tensor:
    """``mean((o - target)^2)`` as an fp32 scalar (fp32 products and sums; the gradient is stored in ``o.dtype``,
    as autograd would hand it back through ``o.float()``). Same contract as ``naive.mse_torch``."""
    check_pair(o, target)
    return _FusedMSE.apply(o, target)


__all__ = ["mse_triton"]
