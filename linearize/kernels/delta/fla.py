"""The gated delta-rule recurrent part on CUDA through fla-core's chunked Triton kernels.

``delta_fla`` computes exactly ``delta_chunked`` (definition: ``kernels/delta/naive.py``) by calling
``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` from fla-core (pinned: ``FLA_CORE_VERSION``; install
``pip install fla-core==0.6.0`` or the ``delta`` extra). fla-core is imported on first use only.

What fla-core 0.6.0 computes (read from its ``naive_recurrent_gated_delta_rule`` and ``chunk_gated_delta_rule``):
layout ``[B, T, H, K]`` (no ``head_first`` flag; it was removed), arguments ``(q, k, v, g, beta, scale,
initial_state, output_final_state, use_qk_l2norm_in_kernel=False, ...)``, state ``h [B, H, K, V]`` fp32, and per
position ``t``

    h = h * exp(g_t);   h = h + k_t (beta_t (v_t - h^T k_t))^T;   o_t = h^T (scale * q_t)

i.e. ``h_t = a_t (I - beta_t k_t k_t^T) h_{t-1} + beta_t k_t v_t^T`` with ``a_t = exp(g_t)``: the decay multiplies
the old state first and the erase reads the decayed state (with a scalar gate the order makes no difference), and
the output is read *after* position t's own update. That is our rule with ``g = log_a``, our ``beta``, ``v = v~``
(value plus the ones column), ``h = S`` in the same ``[F, D + 1]`` orientation, ``scale = 1`` and no in-kernel
L2 norm (the caller normalises). fla reads ``beta`` and ``g`` as given (no sigmoid, ``use_gate_in_kernel`` off).
``tests/kernels/test_delta_backend.py`` checks this mapping on CPU: fla's own naive recurrence run through
``fla_adapted`` equals ``delta_recurrent``.

How the inputs are adapted (our definition is unchanged):

- Window: query ``i`` reads the state after key ``u_i = P + i - W``, which is fla's output at position ``u_i``. So
  fla runs over the ``n = min(Tk, Tk - W + 1)`` keys that enter the state in this call, with query ``i`` placed at
  position ``u_i`` and zero queries elsewhere; queries with ``u_i < 0`` read ``S0`` directly, outside fla. fla's
  final state is then the state after keys ``j <= Tk - W``, our final state.
- Heads: fla needs as many query heads as key heads. Each state head's key, value, beta and decay are repeated for
  the ``H // Hs`` query heads that read it (the state is computed ``H // Hs`` times; no cost when ``Hs == H``), and
  the final state keeps the first copy of each group.
- Sizes: the value dimension ``D + 1`` and the feature dimension ``F`` are zero-padded to a multiple of 16 (fla's
  16-bit backward needs even sizes; zeros change no dot product and no state entry that is kept) and sliced back.
  fla needs ``F <= 256``.
- Dtypes: q, k, v go in their common dtype (bf16 / fp16 inputs stay 16-bit), ``g``, ``beta`` and the state in fp32;
  the outputs are fp32 like every delta path.

fla-core 0.6.0 refuses the backward of gated chunks on Hopper GPUs with Triton >= 3.4.0 and < 3.7.1 (wrong results
there, fla issue #640) unless tilelang is installed; ``fla_backward_refused`` tells ``delta_attention(backend="auto")``
to take the PyTorch path for training in that case.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch import Tensor

from linearize.errors import LinearizeError
from linearize.kernels.delta.naive import check_delta_inputs, initial, read_state, split_read
from linearize.kernels.hybrid.naive import _expand_heads

FLA_CORE_VERSION = "0.6.0"
"""The fla-core release the wrapper was written and tested against (pyproject's ``delta`` extra pins it)."""

_INSTALL = f"pip install fla-core=={FLA_CORE_VERSION}"


def import_fla_gdr():
    """``fla.ops.gated_delta_rule.chunk_gated_delta_rule``, or a LinearizeError saying how to install fla-core."""
    try:
        mod = importlib.import_module("fla.ops.gated_delta_rule")
    except ImportError as e:
        raise LinearizeError(f"the fla backend of the delta rule needs fla-core: `{_INSTALL}` (or the `delta` "
                             f"extra: `pip install 'linearize[delta]'`), or use backend='torch' ({e})") from e
    return mod.chunk_gated_delta_rule


@functools.cache
def has_fla() -> bool:
    """Whether fla-core imports here (asked once per process)."""
    try:
        import_fla_gdr()
    except LinearizeError:
        return False
    return True


def fla_backward_refused(device: torch.device) -> bool:
    """True where fla-core 0.6.0's gated-chunk backward raises (Hopper, Triton in [3.4.0, 3.7.1), no tilelang)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        import triton
    except ImportError:
        return False
    ver = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    return (3, 4, 0) <= ver < (3, 7, 1) and importlib.util.find_spec("tilelang") is None


def _pad_last(x: Tensor, size: int) -> Tensor:
    extra = size - x.shape[-1]
    return x if extra == 0 else torch.cat([x, x.new_zeros(*x.shape[:-1], extra)], dim=-1)


def delta_fla(
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
    """``delta_chunked`` through fla-core's ``chunk_gated_delta_rule`` (CUDA tensors; ``chunk`` in 16, 32, 64).
    Returns ``(L_n [B, H, T, D], L_d [B, H, T], final_state [B, Hs, F, D + 1] or None)``, fp32.

    Raises:
        LinearizeError: fla-core is not installed (the message names ``pip install fla-core==0.6.0``).
        ValueError: shapes that do not match, ``chunk`` not in (16, 32, 64), ``F > 256``, or tensors not on CUDA.
    """
    F = check_delta_inputs(fq, fk, v, beta, log_a, window, initial_state)[6]
    if chunk not in (16, 32, 64):
        raise ValueError(f"fla-core's chunk size must be 16, 32 or 64, got {chunk}")
    if F > 256:
        raise ValueError(f"fla-core's gated delta rule supports feature sizes up to 256, got F={F}")
    chunk_gated_delta_rule = import_fla_gdr()
    if not fq.is_cuda:
        raise ValueError(f"the fla backend of the delta rule runs on CUDA tensors, got {fq.device}; use "
                         "backend='torch' (delta_chunked)")
    return fla_adapted(chunk_gated_delta_rule, fq, fk, v, beta, log_a, window=window, initial_state=initial_state,
                       output_final_state=output_final_state, chunk=chunk)


def fla_adapted(
    kernel,
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
    """Our delta rule through any function with ``chunk_gated_delta_rule``'s signature and meaning (``kernel(q, k,
    v, g, beta, scale=, initial_state=, output_final_state=, use_qk_l2norm_in_kernel=, chunk_size=) -> (o, h_T)``,
    layout ``[B, T, H, K]``): the window shift, head repetition, padding and slicing of the module docstring. On CPU
    the tests pass fla-core's own naive recurrence here, which checks the mapping of conventions without a GPU."""
    B, H, T, Hs, _, Tk, F, D = check_delta_inputs(fq, fk, v, beta, log_a, window, initial_state)
    P = Tk - T
    E = D + 1
    rep = H // Hs
    n = max(0, min(Tk, Tk - window + 1))  # keys that enter the state in this call
    i0 = min(T, max(0, window - P))  # queries 0 .. i0 - 1 read S0
    nq = T - i0
    u0 = P + i0 - window  # fla position of query i0; queries fill positions [u0, u0 + nq)

    S0 = initial(initial_state, B, Hs, F, D, fq)
    reads = [read_state(fq[:, :, :i0], S0)] if i0 else []
    final = S0.clone() if output_final_state else None
    if n and (nq or output_final_state):
        dt = torch.promote_types(torch.promote_types(fq.dtype, fk.dtype), v.dtype)
        dt = dt if dt in (torch.float16, torch.bfloat16) else torch.float32
        Fp, Ep = -(-F // 16) * 16, -(-E // 16) * 16
        q = fq[:, :, i0:].to(dt)
        q = torch.cat([q.new_zeros(B, H, u0, F), q, q.new_zeros(B, H, n - u0 - nq, F)], dim=2)
        k = _expand_heads(fk[:, :, :n].to(dt), H)
        va = v[:, :, :n].to(dt)
        va = _expand_heads(torch.cat([va, torch.ones_like(va[..., :1])], dim=-1), H)  # v~ per query head
        g = _expand_heads(log_a[:, :, :n].float(), H)
        b = _expand_heads(beta[:, :, :n].float(), H)

        def seq(x: Tensor, size: int) -> Tensor:  # [B, H, n, d] -> fla's [B, n, H, size], zero-padded
            return _pad_last(x, size).transpose(1, 2).contiguous()

        h0 = None
        if initial_state is not None:
            h0 = _expand_heads(_pad_last(S0, Ep), H)
            h0 = torch.cat([h0, h0.new_zeros(B, H, Fp - F, Ep)], dim=2) if Fp > F else h0
            h0 = h0.contiguous()
        o, hT = kernel(
            seq(q, Fp), seq(k, Fp), seq(va, Ep), g.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous(),
            scale=1.0, initial_state=h0, output_final_state=output_final_state, use_qk_l2norm_in_kernel=False,
            chunk_size=chunk,
        )
        if nq:
            reads.append(o[:, u0 : u0 + nq, :, :E].transpose(1, 2).float())  # [B, H, nq, E]
        if output_final_state:
            final = hT[:, ::rep, :F, :E].float()
    r = torch.cat(reads, dim=2) if reads else fq.new_zeros(B, H, 0, E, dtype=torch.float32)
    L_n, L_d = split_read(r)
    return L_n, L_d, final
