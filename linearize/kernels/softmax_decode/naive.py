"""PyTorch reference for one softmax-attention decoding step over a preallocated KV buffer (no triton needed).

Layout (``decode.py`` is the Triton version of the same contract):

    q        [B, H, d]          the new token's queries (H = G * Hk query heads, G per kv head)
    k, v     [B, Hk, d], [B, Hk, D]   the new token's key and value
    k_cache  [B, Hk, C, d]      v_cache [B, Hk, C, D]: C slots of capacity, key j in slot j
    pos      [B] int32          keys already cached per sequence (the new token's slot); the caller advances it

Step: write k, v to slot ``pos[b]``, then o = softmax(scale * q k_j^T) v_j over j = 0 .. pos[b] (the new key
included). Scores and the softmax run in fp32; o is cast back to ``v``'s dtype. This reference reads the whole
buffer (masked): it is the definition and the CPU fallback, not the fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_decode(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> None:
    """Raise ``ValueError`` unless the tensors follow the layout of the module docstring."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q [B, H, d], k [B, Hk, d], v [B, Hk, D] expected (one token per sequence), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, d = q.shape
    Hk, D = v.shape[1], v.shape[2]
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
    if k_cache.dim() != 4 or k_cache.shape[:2] != (B, Hk) or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must be [B, Hk, C, d] = [{B}, {Hk}, C, {d}], got {tuple(k_cache.shape)}")
    if v_cache.shape != (B, Hk, k_cache.shape[2], D):
        raise ValueError(f"v_cache must be [B, Hk, C, D] = [{B}, {Hk}, {k_cache.shape[2]}, {D}], got "
                         f"{tuple(v_cache.shape)}")
    if pos.shape != (B,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be an int32/int64 tensor of shape ({B},), got {tuple(pos.shape)} {pos.dtype}")


def softmax_decode_step_naive(q: Tensor, k: Tensor, v: Tensor, *, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                              scale: float) -> Tensor:
    """One decoding step (module docstring): writes ``k, v`` into the caches at ``pos`` in place and returns
    o [B, H, D] in ``v.dtype``. ``pos`` is not advanced. Every index is a device tensor (no host sync), so a CUDA
    graph can hold this step too."""
    check_decode(q, k, v, k_cache, v_cache, pos)
    B, H, d = q.shape
    Hk, C = k_cache.shape[1], k_cache.shape[2]
    rows = torch.arange(B, device=q.device)
    slot = pos.long()
    k_cache[rows, :, slot] = k.to(k_cache.dtype)  # [B, Hk, d] into slot pos[b] of each row
    v_cache[rows, :, slot] = v.to(v_cache.dtype)
    qf = q.float().view(B, Hk, H // Hk, d)  # (B, Hk, G, d)
    s = torch.einsum("bhgd,bhnd->bhgn", qf, k_cache.float()) * scale  # (B, Hk, G, C)
    filled = torch.arange(C, device=q.device)[None, :] <= slot[:, None]  # (B, C): slots 0 .. pos
    s = s.masked_fill(~filled[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, dim=-1), v_cache.float())  # (B, Hk, G, D)
    return o.reshape(B, H, -1).to(v.dtype)


__all__ = ["check_decode", "softmax_decode_step_naive"]
