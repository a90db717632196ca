"""The attention-transfer loss: mean squared error between a layer's output and its teacher's, as a PyTorch
reference (``naive.py``) and a fused Triton kernel that computes the loss and its gradient in one pass
(``fused.py``). Backends as for the other kernels: ``"auto"`` = triton for CUDA tensors when it imports."""

from __future__ import annotations

from torch import Tensor

from linearize.kernels.backend import pick_backend
from linearize.kernels.mse.naive import mse_torch

try:  # triton is optional (CPU installs); the torch path always works
    from linearize.kernels.mse.fused import mse_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    mse_triton = None
    HAS_TRITON = False


def mse(o: Tensor, target: Tensor, *, backend: str = "auto") -> Tensor:
    """``mean((o - target)^2)`` over every element, an fp32 scalar, differentiable.

    Raises:
        ValueError: shapes differ, empty tensors, or an unknown backend.
    """
    if pick_backend(backend, o, has_triton=HAS_TRITON) == "triton":
        return mse_triton(o, target)
    return mse_torch(o, target)


__all__ = ["mse", "mse_torch", "mse_triton"]
