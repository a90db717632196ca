"""Kernels: pure functions over tensors. Each op folder has a readable PyTorch reference (``naive.py``).

``hybrid_attention`` is the single entry point the attention modules call; it picks the fastest available
implementation for the inputs (``backend="auto"``) or the one asked for. ``hybrid_decode_step`` is the matching
one-token step over ring-buffer caches (see ``kernels/hybrid/decode.py``), ``window_decode_step`` the step of a
layer's exact part alone (a window-only layer: no state). ``delta_attention`` /
``delta_decode_step`` are the gated delta-rule recurrent part (``kernels/delta/``; backends "auto", "torch", "fla").
``softmax_decode_step`` is the decode step of the softmax layers a model keeps, over a static KV buffer whose filled
length is a device tensor (``kernels/softmax_decode/``).

Backends: ``"torch"`` = the chunked PyTorch reference; ``"triton"`` = the fused kernels (``kernels/hybrid/chunk.py``,
``decode.py``), also on CPU tensors under ``TRITON_INTERPRET=1``; ``"auto"`` = triton for CUDA tensors when triton
imports, torch otherwise. ``key_mask`` (padding) is torch-only: with a mask every backend runs the torch path.
"""

from __future__ import annotations

from torch import Tensor

from linearize.kernels.backend import BACKENDS, check_backend, pick_backend
from linearize.kernels.delta import delta_attention, delta_chunked, delta_decode_step, delta_fla, delta_recurrent
from linearize.kernels.hybrid.decode_torch import hybrid_decode_step_torch, window_decode_step_torch
from linearize.kernels.hybrid.naive import (
    NO_SINK,
    Sinks,
    State,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
)
from linearize.kernels.softmax_decode import softmax_decode_step

try:  # triton is optional (CPU installs); the torch path always works
    from linearize.kernels.hybrid.chunk import hybrid_attention_triton
    from linearize.kernels.hybrid.decode import hybrid_decode_step as _decode_triton
    from linearize.kernels.hybrid.decode import window_decode_step as _window_decode_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    hybrid_attention_triton = None
    _decode_triton = None
    _window_decode_triton = None
    HAS_TRITON = False


def _pick(backend: str, x: Tensor, key_mask: Tensor | None = None) -> str:
    if key_mask is not None:  # padding masks are torch-only
        check_backend(backend)
        return "torch"
    return pick_backend(backend, x, has_triton=HAS_TRITON)


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
    sinks: Sinks | None = None,
) -> tuple[Tensor, State | None]:
    """Causal hybrid (window ``W > 0``) or pure linear (``W == 0``) attention; see ``kernels/hybrid/naive.py``
    for the definition and tensor layouts. ``backend="torch"`` forces the chunked PyTorch reference,
    ``backend="triton"`` the fused kernels (except with ``key_mask``, which always runs the torch path). ``sinks``:
    optional attention-sink keys (``naive.py``; ``kernels/hybrid/sinks.py`` picks them)."""
    if _pick(backend, v, key_mask) == "triton":
        return hybrid_attention_triton(
            q, k, v, fq, fk, gamma, window=window, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, eps=eps, sinks=sinks,
        )
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=window, scale=scale, key_mask=key_mask,
        initial_state=initial_state, output_final_state=output_final_state, eps=eps, sinks=sinks,
    )


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
    backend: str = "auto",
    out: Tensor | None = None,
    sinks: Sinks | None = None,
    launch=None,
) -> Tensor:
    """One decoding step for every sequence of the batch: returns o [B, H, 1, D] and updates ``state`` (fp32
    ``(S [B, Hs, F, D], z [B, Hs, F])``) and the ring-buffer caches ``k_cache [B, Hk, W, d]``,
    ``v_cache [B, Hk, W, D]``, ``fk_cache [B, Hs, W, F]`` in place; ``pos [B]`` is the new token's position (the
    caller advances it). Equal to ``hybrid_attention(..., T=1, prefix = last W - 1 keys, initial_state=state,
    output_final_state=True)``; see ``kernels/hybrid/decode.py``. ``out``: optional contiguous
    ``[B, H, 1, D]`` buffer of ``v.dtype`` that receives the output (no allocation per step). ``sinks``:
    ``(k_s, v_s, sink_pos [B, E])`` with positions in the same coordinates as ``pos`` (read only; the caller
    keeps a new sink's phi(k) zero and stores it). ``launch``: the Triton kernel's launch options
    (``kernels.hybrid.decode.DecodeLaunch``; None = the default, which picks the fused or the split path by size)."""
    kw = dict(state=state, k_cache=k_cache, v_cache=v_cache, fk_cache=fk_cache, pos=pos, window=window,
              scale=scale, eps=eps, out=out, sinks=sinks)
    if _pick(backend, v) == "triton":
        return _decode_triton(q, k, v, fq, fk, gamma, **kw, launch=launch)
    return hybrid_decode_step_torch(q, k, v, fq, fk, gamma, **kw)


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
    backend: str = "auto",
    out: Tensor | None = None,
    sinks: Sinks | None = None,
) -> Tensor:
    """One decoding step of a layer's exact part alone (a window-only layer, which keeps no state and no phi(k)):
    returns o [B, H, 1, D] and writes the new key and value into ``k_cache [B, Hk, W, d]`` / ``v_cache
    [B, Hk, W, D]`` slot ``pos % W``. Equal to :func:`hybrid_decode_step` with a zero state (and zero phi(k)):
    softmax over the window and the sinks that left it, weighted by ``gamma`` and divided with ``eps`` as there
    (``kernels/hybrid/decode.py: window_decode_step``; reference ``decode_torch.window_decode_step_torch``)."""
    kw = dict(k_cache=k_cache, v_cache=v_cache, pos=pos, window=window, scale=scale, eps=eps, out=out, sinks=sinks)
    if _pick(backend, v) == "triton":
        return _window_decode_triton(q, k, v, gamma, **kw)
    return window_decode_step_torch(q, k, v, gamma, **kw)


__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "NO_SINK",
    "Sinks",
    "State",
    "delta_attention",
    "delta_chunked",
    "delta_decode_step",
    "delta_fla",
    "delta_recurrent",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_quadratic",
    "hybrid_attention_recurrent",
    "hybrid_attention_triton",
    "hybrid_decode_step",
    "hybrid_decode_step_torch",
    "softmax_decode_step",
    "window_decode_step",
    "window_decode_step_torch",
]
