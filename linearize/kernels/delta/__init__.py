"""Gated delta-rule recurrent part for hybrid attention (definition, layouts and head mapping: ``naive.py``).

``delta_attention`` is the entry point: ``backend="torch"`` runs ``delta_chunked`` (PyTorch, any device),
``backend="fla"`` runs ``delta_fla`` (fla-core's Triton kernels, CUDA; ``fla.py``), ``backend="auto"`` takes fla
for CUDA tensors when fla-core imports, ``chunk`` is one it accepts (16, 32, 64) and, when gradients are needed,
fla's backward runs on this GPU (``fla_backward_refused``); PyTorch otherwise. ``delta_decode_step`` is the one-token
step (``decode.py``, PyTorch, CUDA-graph capturable); ``delta_recurrent`` the key-by-key reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.delta.decode import delta_decode_step
from linearize.kernels.delta.fla import FLA_CORE_VERSION, delta_fla, fla_backward_refused, has_fla
from linearize.kernels.delta.naive import delta_chunked, delta_recurrent

DELTA_BACKENDS = ("auto", "torch", "fla")


def pick_delta_backend(backend: str, fq: Tensor, *inputs: Tensor | None, chunk: int = 64) -> str:
    """``"fla"`` or ``"torch"`` for these inputs (see the module docstring)."""
    if backend not in DELTA_BACKENDS:
        raise ValueError(f"backend must be one of {DELTA_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not (fq.is_cuda and chunk in (16, 32, 64) and has_fla()):
        return "torch"
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (fq, *inputs))
    return "torch" if needs_grad and fla_backward_refused(fq.device) else "fla"


def delta_attention(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    beta: Tensor,
    log_a: Tensor,
    *,
    window: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The delta-rule recurrent part: ``(L_n [B, H, T, D], L_d [B, H, T], final_state)`` in fp32, as defined in
    ``kernels/delta/naive.py``, by the backend picked as the module docstring says."""
    kw = {"window": window, "initial_state": initial_state, "output_final_state": output_final_state, "chunk": chunk}
    if pick_delta_backend(backend, fq, fk, v, beta, log_a, initial_state, chunk=chunk) == "fla":
        return delta_fla(fq, fk, v, beta, log_a, **kw)
    return delta_chunked(fq, fk, v, beta, log_a, **kw)


__all__ = [
    "DELTA_BACKENDS",
    "FLA_CORE_VERSION",
    "delta_attention",
    "delta_chunked",
    "delta_decode_step",
    "delta_fla",
    "delta_recurrent",
    "fla_backward_refused",
    "has_fla",
    "pick_delta_backend",
]
