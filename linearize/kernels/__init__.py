"""Kernels: pure functions over tensors. Each op folder has a readable PyTorch reference (``naive.py``).

``hybrid_attention`` is the single entry point the attention modules call; it picks the fastest available
implementation for the inputs (``backend="auto"``) or the one asked for.
"""

from __future__ import annotations

from torch import Tensor

from linearize.kernels.hybrid.naive import (
    State,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
)

BACKENDS = ("auto", "torch", "triton")


def hybrid_attention(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor | None = None,
    *,
    window: int,
    scale: float,
    key_mask: Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[Tensor, State | None]:
    """Causal hybrid (window ``W > 0``) or pure linear (``W == 0``) attention; see ``kernels/hybrid/naive.py``
    for the definition and tensor layouts. ``backend="torch"`` forces the chunked PyTorch reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=window, scale=scale, key_mask=key_mask,
        initial_state=initial_state, output_final_state=output_final_state, eps=eps,
    )


__all__ = [
    "BACKENDS",
    "State",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_quadratic",
    "hybrid_attention_recurrent",
]
