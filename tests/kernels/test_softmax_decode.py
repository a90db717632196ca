"""Softmax decode step over a preallocated KV buffer (``kernels/softmax_decode``): the Triton kernels against the
PyTorch reference, and the reference against the definition (SDPA over the filled slots).

Runs on CPU through the Triton interpreter where there is no GPU (``TRITON_INTERPRET=1``, set by the conftests) and
compiled on CUDA tensors where there is one. Sizes are small and awkward: odd head dims, GQA groups of 3, lengths
that are not multiples of the key block, a length of 1 (only the new key), different lengths per sequence, the
last free slot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import triton_device, triton_problem

if triton_problem():
    pytest.skip(triton_problem(), allow_module_level=True)

from linearize.kernels import softmax_decode_step
from linearize.kernels.softmax_decode import softmax_decode_step_naive, softmax_decode_step_triton
from tests.kernels.conftest import assert_close

DEV = triton_device()

CASES = [
    # (B, H, Hk, d, D, C, keys already cached per sequence)
    (1, 2, 2, 16, 16, 40, [0]),  # length 1: only the new key
    (2, 6, 2, 20, 12, 37, [17, 36]),  # GQA 3, odd dims, the last free slot
    (3, 4, 1, 24, 24, 100, [5, 63, 64]),  # lengths around the key block
    (2, 3, 3, 60, 60, 130, [129, 1]),  # head dim 60, a full buffer after the write
]


def _ids(c):
    B, H, Hk, d, D, C, pos = c
    return f"B{B}-H{H}-Hk{Hk}-d{d}-D{D}-C{C}-pos{'.'.join(map(str, pos))}"


def _inputs(c, dtype, seed=0):
    B, H, Hk, d, D, C, pos = c
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)
    q, k, v = mk(B, H, d), mk(B, Hk, d), mk(B, Hk, D)
    kc, vc = mk(B, Hk, C, d), mk(B, Hk, C, D)  # slots past pos hold garbage the step must not read
    return q, k, v, kc, vc, torch.tensor(pos, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_is_sdpa_over_the_filled_slots(case):
    q, k, v, kc, vc, pos = _inputs(case, torch.float32)
    B, H, Hk = q.shape[0], q.shape[1], k.shape[1]
    o = softmax_decode_step_naive(q, k, v, k_cache=kc, v_cache=vc, pos=pos, scale=0.3)
    for b in range(B):
        n = int(pos[b])
        assert torch.equal(kc[b, :, n], k[b]) and torch.equal(vc[b, :, n], v[b])
        keys = kc[b, :, : n + 1].repeat_interleave(H // Hk, dim=0)  # (H, n + 1, d)
        vals = vc[b, :, : n + 1].repeat_interleave(H // Hk, dim=0)
        want = F.scaled_dot_product_attention(q[b, :, None], keys, vals, scale=0.3)[:, 0]
        assert_close(f"o[{b}]", want, o[b], 1e-5)


@pytest.mark.parametrize("splits", [None, 1, 3], ids=["splits-auto", "splits-1", "splits-3"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_step_matches_reference(case, splits):
    q, k, v, kc, vc, pos = _inputs(case, torch.float32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = softmax_decode_step_naive(q, k, v, k_cache=kc_ref, v_cache=vc_ref, pos=pos, scale=0.25)
    got = softmax_decode_step_triton(q, k, v, k_cache=kc, v_cache=vc, pos=pos, scale=0.25, num_splits=splits)
    assert_close("o", ref, got, 1e-5)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # the new slot written, nothing else touched


def test_triton_step_bf16_within_rounding_of_fp32_reference():
    case = CASES[2]
    q, k, v, kc, vc, pos = _inputs(case, torch.bfloat16)
    ref = softmax_decode_step_naive(q.float(), k.float(), v.float(), k_cache=kc.float(), v_cache=vc.float(),
                                    pos=pos, scale=0.2)
    got = softmax_decode_step(q, k, v, k_cache=kc, v_cache=vc, pos=pos, scale=0.2, backend="triton")
    assert got.dtype == torch.bfloat16
    assert_close("o bf16", ref, got.float(), 1e-2)


def test_consecutive_steps_equal_one_pass_over_the_sequence():
    """Steps from an empty buffer, ``pos`` advanced by the caller each time: step t's output is causal softmax
    attention of query t over keys 0..t."""
    B, H, Hk, d, C, T = 2, 4, 2, 12, 24, 19
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, T, d, generator=g).to(DEV) for h in (H, Hk, Hk))
    kc, vc = torch.zeros(B, Hk, C, d, device=DEV), torch.zeros(B, Hk, C, d, device=DEV)
    pos = torch.zeros(B, dtype=torch.int32, device=DEV)
    outs = []
    for t in range(T):
        outs.append(softmax_decode_step(q[:, :, t], k[:, :, t], v[:, :, t], k_cache=kc, v_cache=vc, pos=pos,
                                        scale=d ** -0.5, backend="triton"))
        pos += 1
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert_close("steps", want, torch.stack(outs, 2), 1e-5)


def test_shape_errors_name_the_layout():
    q, k, v, kc, vc, pos = _inputs(CASES[1], torch.float32)
    with pytest.raises(ValueError, match="k_cache must be"):
        softmax_decode_step(q, k, v, k_cache=kc[:, :1], v_cache=vc, pos=pos, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="pos must be"):
        softmax_decode_step(q, k, v, k_cache=kc, v_cache=vc, pos=pos[:1], scale=1.0, backend="torch")
    with pytest.raises(ValueError, match="multiple of key heads"):
        softmax_decode_step(q[:, :5], k, v, k_cache=kc, v_cache=vc, pos=pos, scale=1.0, backend="torch")
