"""One decoding step of the gated delta-rule recurrent part (definition: ``kernels/delta/naive.py``).

At each generated token the key that leaves the sliding window (the token ``W`` back; with ``W == 0`` the new token's
own key) enters the state, then the new query reads it. Rows of the batch whose window has not filled yet have no key
to fold: ``enter[b] = False`` leaves their state untouched (their ``fk_in`` / ``v_in`` may hold anything, even NaN:
the new state is selected with ``torch.where``, not multiplied by zero).

The step is CUDA-graph capturable: fixed shapes, no ``.item()``, no Python branch on tensor values (``enter is None``
is a static choice of the caller).
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.kernels.delta.naive import delta_step, read_state, split_read


def delta_decode_step(
    fq: Tensor,
    state: Tensor,
    fk_in: Tensor,
    v_in: Tensor,
    beta_in: Tensor,
    log_a_in: Tensor,
    enter: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold the key leaving the window into ``state`` IN PLACE, then read it with the new query.

    Args:
        fq: ``[B, H, 1, F]`` the new token's feature-mapped, L2-normalised query.
        state: ``[B, Hs, F, D + 1]`` fp32, updated in place (last column = normaliser).
        fk_in: ``[B, Hs, F]`` the entering key (L2-normalised); ``v_in [B, Hk, D]`` its value;
            ``beta_in`` / ``log_a_in [B, Hs]`` its write strength and log decay.
        enter: bool ``[B]``, False where no key enters this step; None = every row takes its key.

    Returns:
        ``(L_n [B, H, 1, D], L_d [B, H, 1])`` fp32, as ``delta_recurrent`` gives for this query.
    """
    B, _, _, F = fq.shape
    Hs, E = state.shape[1], state.shape[-1]
    if state.dtype != torch.float32 or tuple(state.shape) != (B, Hs, F, E) or tuple(v_in.shape[::2]) != (B, E - 1):
        raise ValueError(f"state must be fp32 [B, Hs, F, D + 1] with fq [B, H, 1, F] = {tuple(fq.shape)} and "
                         f"v_in [B, Hk, D] = {tuple(v_in.shape)}; got {state.dtype} {tuple(state.shape)}")
    v = v_in.float()
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, Hk, E]
    rep = Hs // v.shape[1]
    if rep > 1:
        v_aug = v_aug.repeat_interleave(rep, dim=1)
    new = delta_step(state, fk_in, v_aug, beta_in, log_a_in)
    if enter is not None:
        new = torch.where(enter.reshape(B, 1, 1, 1), new, state)
    state.copy_(new)
    L_n, L_d = split_read(read_state(fq, state))
    return L_n, L_d
