"""The decode step of a layer's exact part alone (a window-only layer: no state, no phi(k) ring), against the hybrid
step with a zero state that it replaces, and its Triton kernel against its PyTorch reference.

Several consecutive steps from the same ring buffers, so that positions pass the window (keys leave it) and sinks
start to count; GQA (query heads over key heads), windows of 1, 3 and 8, sinks on and off. The Triton kernel runs on
CPU through the interpreter where there is no GPU (``TRITON_INTERPRET=1``, set by the conftests). fp32, tiny sizes
(bf16 and CUDA graphs: ``tests/gpu/test_gpu_window_decode.py``)."""

from __future__ import annotations

import pytest
import torch

from linearize.kernels import hybrid_decode_step_torch, window_decode_step, window_decode_step_torch
from linearize.kernels.hybrid.naive import NO_SINK
from tests.conftest import triton_device, triton_problem

B, H, HK, D_K, D_V, F = 3, 4, 2, 16, 16, 8
STEPS = 6


def _inputs(W, *, sinks, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    kc, vc = r(B, HK, W, D_K), r(B, HK, W, D_V)
    pos = torch.tensor([0, W - 1, W + 2])  # an empty window, a full one, one whose oldest keys have left
    sk = None
    if sinks:  # row 0: one sink at position 0 and an empty slot; rows 1 and 2: positions 0 and 1
        spos = torch.tensor([[0, NO_SINK], [0, 1], [0, 1]])
        sk = (r(B, HK, 2, D_K), r(B, HK, 2, D_V), spos)
    steps = [(r(B, H, D_K), r(B, HK, D_K), r(B, HK, D_V)) for _ in range(STEPS)]
    gamma = torch.rand(H, generator=g) + 0.1
    return kc, vc, pos, sk, steps, gamma


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("W", [1, 3, 8])
def test_window_step_is_the_hybrid_step_with_a_zero_state(W, sinks):
    kc, vc, pos, sk, steps, gamma = _inputs(W, sinks=sinks)
    kc2, vc2, pos2 = kc.clone(), vc.clone(), pos.clone()
    S, z = torch.zeros(B, HK, F, D_V), torch.zeros(B, HK, F)
    fkc = torch.zeros(B, HK, W, F)
    g = torch.Generator().manual_seed(1)
    for q, k, v in steps:
        fq = torch.rand(B, H, F, generator=g)  # any phi(q): the state it reads is zero
        ref = hybrid_decode_step_torch(q, k, v, fq, torch.zeros(B, HK, F), gamma, state=(S, z), k_cache=kc,
                                       v_cache=vc, fk_cache=fkc, pos=pos, window=W, scale=0.25, sinks=sk)
        got = window_decode_step_torch(q, k, v, gamma, k_cache=kc2, v_cache=vc2, pos=pos2, window=W, scale=0.25,
                                       sinks=sk)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kc2, kc, rtol=0, atol=0)
        torch.testing.assert_close(vc2, vc, rtol=0, atol=0)
        pos += 1
        pos2 += 1
    assert S.abs().sum() == 0  # phi(k) was zero throughout: nothing entered the state


def test_window_step_output_is_a_softmax_over_the_window():
    """One row, W = 3 at position 5: keys 3, 4 (ring) and 5 (new); the output is their softmax mix of values."""
    g = torch.Generator().manual_seed(3)
    W = 3
    kc, vc = torch.randn(1, 1, W, 4, generator=g), torch.randn(1, 1, W, 4, generator=g)
    q, k, v = torch.randn(1, 1, 4, generator=g), torch.randn(1, 1, 4, generator=g), torch.randn(1, 1, 4, generator=g)
    pos = torch.tensor([5])
    keys = torch.stack([kc[0, 0, 3 % W], kc[0, 0, 4 % W], k[0, 0]])
    vals = torch.stack([vc[0, 0, 3 % W], vc[0, 0, 4 % W], v[0, 0]])
    want = torch.softmax(keys @ q[0, 0] * 0.5, 0) @ vals
    got = window_decode_step_torch(q, k, v, torch.ones(1), k_cache=kc, v_cache=vc, pos=pos, window=W, scale=0.5,
                                   eps=0.0)
    torch.testing.assert_close(got[0, 0, 0], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc[0, 0, 5 % W], k[0, 0])


@pytest.mark.skipif(bool(triton_problem()), reason=triton_problem() or "triton runs")
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("W", [1, 3, 8])
def test_triton_window_step_matches_the_reference(W, sinks):
    dev = triton_device()
    kc, vc, pos, sk, steps, gamma = _inputs(W, sinks=sinks, seed=2)
    kc2, vc2, pos2 = kc.to(dev), vc.to(dev), pos.to(dev)
    sk2 = None if sk is None else tuple(x.to(dev) for x in sk)
    for q, k, v in steps:
        ref = window_decode_step_torch(q, k, v, gamma, k_cache=kc, v_cache=vc, pos=pos, window=W, scale=0.25,
                                       sinks=sk)
        out = torch.empty(B, H, 1, D_V, device=dev)
        got = window_decode_step(q.to(dev), k.to(dev), v.to(dev), gamma.to(dev), k_cache=kc2, v_cache=vc2, pos=pos2,
                                 window=W, scale=0.25, sinks=sk2, backend="triton", out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc2.cpu(), kc, rtol=0, atol=0)
        torch.testing.assert_close(vc2.cpu(), vc, rtol=0, atol=0)
        pos += 1
        pos2 += 1


def test_window_step_refuses_bad_shapes():
    kc, vc, pos, _, steps, gamma = _inputs(3, sinks=False)
    q, k, v = steps[0]
    with pytest.raises(ValueError, match="window >= 1"):
        window_decode_step_torch(q, k, v, gamma, k_cache=kc, v_cache=vc, pos=pos, window=0, scale=1.0)
    with pytest.raises(ValueError, match="ring buffer"):
        window_decode_step_torch(q, k, v, gamma, k_cache=kc[:, :, :2], v_cache=vc, pos=pos, window=3, scale=1.0)
    with pytest.raises(ValueError, match="gamma"):
        window_decode_step_torch(q, k, v, gamma[:2], k_cache=kc, v_cache=vc, pos=pos, window=3, scale=1.0)
