"""PyTorch references for the gated delta-rule recurrent part of hybrid attention.

The additive linear part (``kernels/hybrid/naive.py``) keeps ``S = sum phi(k) v^T``: every key only adds, so the
state fills up and old associations blur. The delta rule first *erases* what the state held for a key and then writes
the new value there, with a per-key write strength ``beta`` and a per-key decay ``a`` (gated delta rule; see
method-notes, "State forms that keep long-range recall"). This file holds the definition and the two forms every
faster path is tested against: ``delta_recurrent`` (one key at a time, the readable one) and ``delta_chunked`` (chunks
of keys at once, the CPU training and prefill path). All arithmetic runs in fp32 and the outputs are fp32.

Definition. Keys are indexed ``j = 0 .. Tk-1`` in this call; the last ``T`` keys belong to the ``T`` queries (query
``i`` has key index ``P + i``, ``P = Tk - T``; the first ``P`` keys are a prefix, e.g. the cached window). For each
state head ``s`` the state ``S`` is an ``[F, D + 1]`` fp32 matrix:

    v~_j = [v_j, 1]                                         value with a ones column appended (D + 1)
    S_j  = a_j (I - beta_j k_j k_j^T) S_{j-1} + beta_j k_j v~_j^T
         = a_j (S_{j-1} - beta_j k_j (k_j^T S_{j-1})) + beta_j k_j v~_j^T          (when key j enters the state)
    r_i  = S^T fq_i  with S the state after every key j <= P + i - W (S0 when there is none)
    L_n[i] = r_i[:D],   L_d[i] = max(r_i[D], 0)

with ``a_j = exp(log_a_j)`` in (0, 1] and ``beta_j`` in [0, 1]. The ones column makes the last column of ``S`` the
normaliser: one state carries both numerator and denominator, as the additive form's ``(S, z)`` pair does, and the
same erase applies to both. ``L_d`` is clamped at 0 because an erase can drive that column negative; the clamp is part
of the definition (the caller divides ``L_n`` by ``L_d + ...`` as it does for the additive form).

The rule assumes unit keys, ``||k_j|| = 1``: then ``I - beta k k^T`` has eigenvalues ``1 - beta`` and 1 and the state
stays bounded. The functions here do not normalise; the caller passes feature-mapped, L2-normalised ``fq`` and ``fk``.

Window. A key leaves the sliding window and enters the state at exactly one query, as in the additive form: query
``i`` reads the state after keys ``j <= P + i - W`` (``W == 0``: its own key included). The final state (returned when
``output_final_state``) is the one the *next* query (index ``Tk``) reads: the state after keys ``j <= Tk - W``.

Padding: the caller writes ``beta = 0`` and ``log_a = 0`` for a padding key. Its update is then the identity, so it
touches nothing (the same as dropping the key).

Layout ``[B, heads, T, dim]``:

    fq     [B, H,  T,  F]   feature-mapped, L2-normalised queries
    fk     [B, Hs, Tk, F]   feature-mapped, L2-normalised keys, one per state head; Tk >= T
    v      [B, Hk, Tk, D]   values
    beta   [B, Hs, Tk]      write strength in [0, 1]
    log_a  [B, Hs, Tk]      log decay, <= 0
    initial_state [B, Hs, F, D + 1] fp32 or None (zeros): the state before key 0 (last column = normaliser)
    returns L_n [B, H, T, D], L_d [B, H, T] and the final state [B, Hs, F, D + 1] (or None), all fp32

Head mapping (as in ``kernels/hybrid/naive.py``): query head ``h`` reads state head ``h // (H // Hs)``; state head
``s`` writes values of head ``s // (Hs // Hk)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_delta_inputs(fq, fk, v, beta, log_a, window, initial_state):
    """Shapes of the delta-rule inputs: ``(B, H, T, Hs, Hk, Tk, F, D)``; ValueError naming the mismatch."""
    B, H, T, F = fq.shape
    Bk, Hk, Tk, D = v.shape
    Hs = fk.shape[1]
    if Bk != B or fk.shape[0] != B:
        raise ValueError(f"batch sizes differ: fq {B}, v {Bk}, fk {fk.shape[0]}")
    if Tk < T or fk.shape[2] != Tk:
        raise ValueError(f"need Tk >= T and fk/v of equal length: T={T}, v has {Tk}, fk has {fk.shape[2]}")
    if fk.shape[3] != F:
        raise ValueError(f"fq and fk feature sizes differ: {F} vs {fk.shape[3]}")
    if H % Hs or Hs % Hk:
        raise ValueError(f"heads must nest: query heads {H}, state heads {Hs}, value heads {Hk}")
    for name, x in (("beta", beta), ("log_a", log_a)):
        if tuple(x.shape) != (B, Hs, Tk):
            raise ValueError(f"{name} must have shape [B, Hs, Tk] = {(B, Hs, Tk)}, got {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, Hs, F, D + 1):
        raise ValueError(f"initial_state must have shape [B, Hs, F, D + 1] = {(B, Hs, F, D + 1)}, "
                         f"got {tuple(initial_state.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return B, H, T, Hs, Hk, Tk, F, D


def augment_values(v: Tensor, Hs: int) -> Tensor:
    """``[B, Hk, Tk, D]`` -> fp32 ``[B, Hs, Tk, D + 1]``: the ones column appended, value heads repeated per state
    head (state head ``s`` reads value head ``s // (Hs // Hk)``)."""
    v = v.float()
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    rep = Hs // v.shape[1]
    return v if rep == 1 else v.repeat_interleave(rep, dim=1)


def initial(initial_state: Tensor | None, B: int, Hs: int, F: int, D: int, like: Tensor) -> Tensor:
    if initial_state is None:
        return torch.zeros(B, Hs, F, D + 1, dtype=torch.float32, device=like.device)
    return initial_state.float()


def read_state(fq: Tensor, S: Tensor) -> Tensor:
    """``fq [B, H, T, F]`` read from ``S [B, Hs, F, E]`` (query head h reads state h // (H // Hs)): fp32
    ``[B, H, T, E]``."""
    B, H, T, F = fq.shape
    Hs = S.shape[1]
    q = fq.float().reshape(B, Hs, H // Hs, T, F)
    return torch.einsum("bsgtf,bsfe->bsgte", q, S).reshape(B, H, T, S.shape[-1])


def split_read(r: Tensor) -> tuple[Tensor, Tensor]:
    """``r [..., D + 1]`` -> ``(L_n = r[..., :D], L_d = max(r[..., D], 0))``."""
    return r[..., :-1], r[..., -1].clamp_min(0.0)


def delta_step(S: Tensor, k: Tensor, v_aug: Tensor, beta: Tensor, log_a: Tensor) -> Tensor:
    """One key entering the state: ``a (S - beta k (k^T S)) + beta k v~^T``. ``S [B, Hs, F, E]``, ``k [B, Hs, F]``,
    ``v_aug [B, Hs, E]``, ``beta`` / ``log_a [B, Hs]``; returns the new state (out of place)."""
    b = beta.float()[..., None, None]
    a = log_a.float().exp()[..., None, None]
    k = k.float()
    kS = torch.einsum("bsf,bsfe->bse", k, S)  # k^T S: what the state holds for this key
    return a * (S - b * k[..., :, None] * kS[..., None, :]) + b * k[..., :, None] * v_aug[..., None, :]


def delta_recurrent(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    beta: Tensor,
    log_a: Tensor,
    *,
    window: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Key-by-key form, the readable reference: before each query, the keys that left its window enter the state
    one at a time (``delta_step``); then the query reads the state. Returns ``(L_n, L_d, final_state)``."""
    B, H, T, Hs, _, Tk, F, D = check_delta_inputs(fq, fk, v, beta, log_a, window, initial_state)
    P = Tk - T
    v_aug = augment_values(v, Hs)  # [B, Hs, Tk, D + 1]
    S = initial(initial_state, B, Hs, F, D, fq)
    entered = 0  # keys 0 .. entered - 1 are in S
    reads = []
    for i in range(T):
        last = P + i - window  # the newest key query i reads (< 0: none, it reads S0)
        while entered <= last:
            j = entered
            S = delta_step(S, fk[:, :, j], v_aug[:, :, j], beta[:, :, j], log_a[:, :, j])
            entered += 1
        reads.append(read_state(fq[:, :, i : i + 1], S))
    r = torch.cat(reads, dim=2) if reads else fq.new_zeros(B, H, 0, D + 1, dtype=torch.float32)
    final = None
    if output_final_state:
        while entered <= min(Tk - 1, Tk - window):
            j = entered
            S = delta_step(S, fk[:, :, j], v_aug[:, :, j], beta[:, :, j], log_a[:, :, j])
            entered += 1
        final = S
    L_n, L_d = split_read(r)
    return L_n, L_d, final


def delta_chunked(
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
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunkwise form (the WY / UT representation), equal to ``delta_recurrent``; autograd-friendly (no in-place
    writes), O(Tk * C) work inside chunks plus one state pass per chunk.

    The window is a shift: query ``i`` reads the state right after key ``u_i = P + i - W``, so the queries sit in
    "slots" of the key sequence and the scan runs over the ``n = min(Tk, Tk - W + 1)`` keys that enter the state in
    this call (queries with ``u_i < 0`` read ``S0``). Inside a chunk of ``C`` keys with state ``S`` at its start,
    write ``G_t = sum_{r <= t} log a_r`` (within the chunk) and ``u_t = beta_t (v~_t - a_t S_{t-1}^T k_t)`` (the
    value actually written). Then ``S_t = a_t S_{t-1} + k_t u_t^T``, and unrolling:

        (I + A) U = diag(beta) V~ - diag(beta e^G) K S,   A_tr = beta_t e^(G_t - G_r) k_t.k_r  (r < t, else 0)
        o_t   = e^(G_t) S^T q_t + sum_{r <= t} e^(G_t - G_r) (q_t.k_r) u_r
        S_end = e^(G_C) S + sum_r e^(G_C - G_r) k_r u_r^T

    ``(I + A)`` is unit lower-triangular; one triangular solve per chunk gives ``U0 = (I + A)^-1 diag(beta) V~`` and
    ``Wm = (I + A)^-1 diag(beta e^G) K`` for every chunk at once, and the pass over chunks only needs
    ``U = U0 - Wm S``. Every exponent is a sum of ``log a <= 0``, so nothing overflows.
    """
    B, H, T, Hs, _, Tk, F, D = check_delta_inputs(fq, fk, v, beta, log_a, window, initial_state)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    P = Tk - T
    E = D + 1
    rep = H // Hs
    S = initial(initial_state, B, Hs, F, D, fq)
    q = fq.float().reshape(B, Hs, rep, T, F)

    n = max(0, min(Tk, Tk - window + 1))  # keys that enter the state in this call
    i0 = min(T, max(0, window - P))  # queries 0 .. i0 - 1 read S0
    reads = [torch.einsum("bsgtf,bsfe->bsgte", q[:, :, :, :i0], S)] if i0 else []
    if n == 0:
        r = torch.cat(reads, dim=3).reshape(B, H, T, E) if reads else q.new_zeros(B, H, 0, E)
        L_n, L_d = split_read(r)
        return L_n, L_d, (S.clone() if output_final_state else None)

    # The n entering keys, padded to whole chunks with identity updates (beta = 0, log a = 0, k = 0).
    C = min(chunk, n)
    N = -(-n // C)
    pad = N * C - n

    def keys(x: Tensor) -> Tensor:  # [B, Hs, Tk, ...] -> [B, Hs, N, C, ...], first n keys, zero-padded
        x = x[:, :, :n].float()
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
        return x.reshape(*x.shape[:2], N, C, *x.shape[3:])

    K = keys(fk)  # [B, Hs, N, C, F]
    V = keys(augment_values(v, Hs))  # [B, Hs, N, C, E]
    b = keys(beta)  # [B, Hs, N, C]
    G = keys(log_a).cumsum(-1)  # [B, Hs, N, C]
    # Query slots: query i (i >= i0) at key index u_i = P + i - W, in [u0, Tk - W); the other slots hold zeros.
    u0 = P + i0 - window
    nq = T - i0
    Q = q[:, :, :, i0:]
    Q = torch.cat([Q.new_zeros(B, Hs, rep, u0, F), Q, Q.new_zeros(B, Hs, rep, N * C - u0 - nq, F)], dim=3)
    Q = Q.reshape(B, Hs, rep, N, C, F)

    t = torch.arange(C, device=fq.device)
    lower = t[:, None] > t[None, :]  # r < t
    lower_eq = t[:, None] >= t[None, :]  # r <= t
    dG = G[..., :, None] - G[..., None, :]  # [B, Hs, N, C(t), C(r)] = G_t - G_r
    decay_eq = torch.where(lower_eq, dG, torch.full_like(dG, float("-inf"))).exp()
    decay_lt = torch.where(lower, decay_eq, torch.zeros_like(decay_eq))
    A = b[..., :, None] * (K @ K.transpose(-1, -2)) * decay_lt
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rhs = torch.cat([b[..., None] * V, (b * G.exp())[..., None] * K], dim=-1)  # [B, Hs, N, C, E + F]
    X = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U0, Wm = X[..., :E], X[..., E:]
    QK = (Q @ K[:, :, None].transpose(-1, -2)) * decay_eq[:, :, None]  # [B, Hs, rep, N, C, C]
    K_end = K * (G[..., -1:] - G).exp()[..., None]  # k_r e^(G_C - G_r)
    g_end = G[..., -1].exp()  # [B, Hs, N]

    slots_end = u0 + nq  # == Tk - W: slots [u0, slots_end) hold queries
    outs = []
    for c in range(N):
        U = U0[:, :, c] - Wm[:, :, c] @ S  # [B, Hs, C, E]
        if c * C < slots_end and (c + 1) * C > u0:  # this chunk holds queries
            Sq = torch.einsum("bsgtf,bsfe->bsgte", Q[:, :, :, c], S) * G[:, :, c].exp()[:, :, None, :, None]
            outs.append(Sq + QK[:, :, :, c] @ U[:, :, None])
        else:
            outs.append(None)
        S = g_end[:, :, c, None, None] * S + K_end[:, :, c].transpose(-1, -2) @ U
    if nq:
        c_first = u0 // C
        o = torch.cat([x for x in outs[c_first:] if x is not None], dim=3)  # slots from c_first * C on
        reads.append(o[:, :, :, u0 - c_first * C : slots_end - c_first * C])
    r = torch.cat(reads, dim=3).reshape(B, H, T, E) if reads else q.new_zeros(B, H, 0, E)
    L_n, L_d = split_read(r)
    return L_n, L_d, (S if output_final_state else None)
