"""Learned feature maps (Hedgehog, BASED) as pure functions: a PyTorch reference (``naive.py``) and fused
Triton kernels, forward and backward (``fused.py``).

``hedgehog_features`` and ``based_features`` are what ``HedgehogFeatureMap`` / ``BasedFeatureMap`` call. Backends:
``"torch"`` = the reference; ``"triton"`` = the fused kernels (also on CPU tensors under ``TRITON_INTERPRET=1``;
raises ``ValueError`` for sizes they do not support); ``"auto"`` = triton for CUDA tensors when triton imports and
the sizes are supported (head dim and projection dim in {16, 32, 64, 128}, float inputs), torch otherwise. Under
autocast an fp32 ``x`` goes to the fused kernels in the autocast dtype (as the reference's einsum would run) and the
features come back in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.backend import BACKENDS, pick_backend
from linearize.kernels.feature_maps.naive import (
    based_feature_dim,
    based_features_torch,
    check_projection,
    hedgehog_features_torch,
)

try:  # triton is optional (CPU installs); the torch path always works
    from linearize.kernels.feature_maps.fused import based_features_triton, fused_supported, hedgehog_features_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    fused_supported = hedgehog_features_triton = based_features_triton = None
    HAS_TRITON = False


def _pick(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> str:
    supported = HAS_TRITON and x.is_cuda and fused_supported(x, weight, bias)
    return pick_backend(backend, x, has_triton=HAS_TRITON, supported=supported)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The low-precision dtype the reference's einsum would run in under autocast, for fp32 ``x``; else None."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def hedgehog_features(x: Tensor, weight: Tensor, bias: Tensor | None, *, backend: str = "auto") -> Tensor:
    """Hedgehog features ``[softmax(x W + b), softmax(-(x W + b))]``: ``x [B, h, T, d]``, ``weight [h, d, p]``,
    ``bias [h, p]`` (or None) -> ``[B, h, T, 2 p]`` in ``x.dtype``. See ``naive.py`` for the definition.

    Raises:
        ValueError: on inconsistent shapes, an unknown backend, or (``backend="triton"``) unsupported sizes.
    """
    check_projection(x, weight, bias, "hedgehog")
    if _pick(backend, x, weight, bias) == "triton":
        lp = _autocast_dtype(x)
        if lp is not None:  # like the reference under autocast: project in lp, return x.dtype
            return hedgehog_features_triton(x.to(lp), weight, bias).to(x.dtype)
        return hedgehog_features_triton(x, weight, bias)
    return hedgehog_features_torch(x, weight, bias)


def based_features(x: Tensor, weight: Tensor, *, backend: str = "auto") -> Tensor:
    """BASED features (2nd-order Taylor of exp) ``[1, y / r^(1/4), c_ij y_i y_j]`` with ``y = x W``: ``x [B, h, T, d]``,
    ``weight [h, d, r]`` -> ``[B, h, T, 1 + r + r (r + 1) / 2]`` in ``x.dtype``. See ``naive.py``.

    Raises:
        ValueError: on inconsistent shapes, an unknown backend, or (``backend="triton"``) unsupported sizes.
    """
    check_projection(x, weight, None, "taylor")
    if _pick(backend, x, weight, None) == "triton":
        lp = _autocast_dtype(x)
        if lp is not None:
            return based_features_triton(x.to(lp), weight).to(x.dtype)
        return based_features_triton(x, weight)
    return based_features_torch(x, weight)


__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "hedgehog_features",
    "hedgehog_features_torch",
    "hedgehog_features_triton",
    "based_feature_dim",
    "based_features",
    "based_features_torch",
    "based_features_triton",
]
