"""Backend choice shared by every kernel dispatcher (attention, feature maps)."""

from __future__ import annotations

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def pick_backend(backend: str, x: Tensor, *, has_triton: bool, supported: bool = True) -> str:
    """``"triton"`` or ``"torch"``: ``"triton"`` is forced (needs the package), ``"auto"`` takes it for CUDA tensors
    when triton imports and the inputs are ``supported`` by the fused kernels, ``"torch"`` never."""
    check_backend(backend)
    if backend == "triton":
        if not has_triton:
            raise ValueError("backend='triton' needs the `triton` package; install it or use backend='torch'")
        return "triton"
    if backend == "auto" and has_triton and x.is_cuda and supported:
        return "triton"
    return "torch"
