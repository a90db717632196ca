"""Softmax attention for one new token per sequence over a preallocated KV buffer whose filled length is a device
tensor (``naive.py``: the contract and the reference; ``decode.py``: the Triton kernels). The decode step of the
softmax layers a converted model keeps (``models/softmax.py``)."""

from __future__ import annotations

from torch import Tensor

from linearize.kernels.backend import pick_backend
from linearize.kernels.softmax_decode.naive import softmax_decode_step_naive

try:  # triton is optional (CPU installs); the torch path always works
    from linearize.kernels.softmax_decode.decode import softmax_decode_step_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    softmax_decode_step_triton = None
    HAS_TRITON = False


def softmax_decode_step(q: Tensor, k: Tensor, v: Tensor, *, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                        scale: float, backend: str = "auto") -> Tensor:
    """Write the new ``k [B, Hk, d]``, ``v [B, Hk, D]`` to slot ``pos[b]`` of ``k_cache [B, Hk, C, d]`` /
    ``v_cache [B, Hk, C, D]`` (in place) and return softmax attention of ``q [B, H, d]`` over slots
    ``0 .. pos[b]``: o [B, H, D] in ``v.dtype``. ``pos [B]`` (int32, on the device) is not advanced.
    ``backend``: "auto" (Triton for CUDA tensors when it imports), "triton" (also CPU under ``TRITON_INTERPRET=1``)
    or "torch" (the reference, which reads the whole buffer). See ``naive.py`` for the layout."""
    if pick_backend(backend, v, has_triton=HAS_TRITON) == "triton":
        return softmax_decode_step_triton(q, k, v, k_cache=k_cache, v_cache=v_cache, pos=pos, scale=scale)
    return softmax_decode_step_naive(q, k, v, k_cache=k_cache, v_cache=v_cache, pos=pos, scale=scale)


__all__ = ["HAS_TRITON", "softmax_decode_step", "softmax_decode_step_naive", "softmax_decode_step_triton"]
