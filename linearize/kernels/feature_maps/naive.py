"""PyTorch references for the learned feature maps (Hedgehog, BASED): the readable definitions that the
fused Triton kernels (``fused.py``) are tested against, and exactly what ``linearize.modules.feature_maps`` computes
with ``backend="torch"`` (the modules call these functions).

Layouts: ``x [B, h, T, d]`` (one row per head and token), per-head parameters ``weight [h, d, p]`` and
``bias [h, p]``. The projection runs in ``x.dtype`` (the parameters are cast to it, as a matmul of mixed dtypes
would fail); everything after the projection runs in fp32 and the features are cast back to ``x.dtype``.

Hedgehog (softmax form, LoLCATs), ``F = 2 p``:

    y   = x W[h] + b[h]
    phi = [softmax(y), softmax(-y)]          (both softmaxes over the last dim)

BASED (2nd-order Taylor of exp), projection ``W [h, d, r]`` without bias, ``F = 1 + r + r (r + 1) / 2``:

    y   = x W[h]
    phi = [1, y / r^(1/4), c_ij y_i y_j for (i, j) in triu_indices(r, r)]
    c_ij = 2^-0.5 / sqrt(r) if i == j else 1 / sqrt(r)

so that ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q'.k' / sqrt(r)``. The pairs are in ``torch.triu_indices``
order (row-major upper triangle: (0, 0), (0, 1), ..., (0, r-1), (1, 1), ...).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_projection(x: Tensor, weight: Tensor, bias: Tensor | None, what: str) -> tuple[int, int, int, int, int]:
    """Shape checks shared by every backend; returns ``(B, h, T, d, p)``.

    Raises:
        ValueError: when x is not ``[B, h, T, d]``, weight not ``[h, d, p]`` or bias not ``[h, p]``.
    """
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be [B, heads, T, d], got shape {tuple(x.shape)}")
    B, h, T, d = x.shape
    if weight.dim() != 3 or weight.shape[0] != h or weight.shape[1] != d:
        raise ValueError(f"{what}: weight must be [heads={h}, d={d}, p], got shape {tuple(weight.shape)}")
    p = weight.shape[2]
    if bias is not None and tuple(bias.shape) != (h, p):
        raise ValueError(f"{what}: bias must be [heads={h}, p={p}], got shape {tuple(bias.shape)}")
    return B, h, T, d, p


def project(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[B, h, T, d] x [h, d, p] (+ [h, p]) -> [B, h, T, p]`` in ``x.dtype`` (same as the modules' ``_project``)."""
    y = torch.einsum("bhtd,hdp->bhtp", x, weight.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)[None, :, None, :]
    return y


def hedgehog_features_torch(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Hedgehog features ``[softmax(y), softmax(-y)]`` with ``y = x W + b``: ``[B, h, T, 2 p]`` in ``x.dtype``."""
    check_projection(x, weight, bias, "hedgehog")
    y = project(x, weight, bias).float()
    return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1).to(x.dtype)


def based_pairs(r: int, device=None) -> tuple[Tensor, Tensor]:
    """Upper-triangle index pairs ``[2, r (r + 1) / 2]`` and their fp32 coefficients ``c_ij``."""
    iu = torch.triu_indices(r, r, device=device)
    coef = torch.where(iu[0] == iu[1], 2.0**-0.5, 1.0) / math.sqrt(r)
    return iu, coef


def based_features_torch(x: Tensor, weight: Tensor) -> Tensor:
    """BASED features (2nd-order Taylor of exp) ``[1, y / r^(1/4), c_ij y_i y_j]`` with ``y = x W``: ``[B, h, T, 1 + r + r(r+1)/2]``
    in ``x.dtype``."""
    check_projection(x, weight, None, "taylor")
    y = project(x, weight, None).float()  # [B, h, T, r]
    r = weight.shape[-1]
    # Upper-triangle index pairs, built per call: non-persistent buffers would not survive meta-device loading.
    iu, coef = based_pairs(r, y.device)
    second = y[..., iu[0]] * y[..., iu[1]] * coef
    ones = torch.ones_like(y[..., :1])
    return torch.cat([ones, y / r**0.25, second], dim=-1).to(x.dtype)


def based_feature_dim(r: int) -> int:
    return 1 + r + r * (r + 1) // 2


__all__ = [
    "FLOAT_DTYPES",
    "check_projection",
    "hedgehog_features_torch",
    "project",
    "based_feature_dim",
    "based_features_torch",
    "based_pairs",
]
