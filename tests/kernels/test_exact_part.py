"""The exact part alone (``kernels/hybrid/exact.py``): with no recurrent part it is the hybrid reference with zero
features, for whole calls (with a prefix, padding and sinks) and for one decode step over the ring."""

from __future__ import annotations

import torch

from linearize.kernels.hybrid.exact import exact_window_decode, exact_window_parts
from linearize.kernels.hybrid.naive import hybrid_attention_quadratic
from linearize.kernels.hybrid.sinks import sequence_sinks


def _inputs(B=2, H=4, Hk=2, T=19, d=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, d, generator=g) for h in (H, Hk, Hk))
    return q, k, v, torch.rand(H, generator=g) + 0.1


def test_whole_call_with_prefix_padding_and_sinks_equals_the_reference_without_features():
    q, k, v, gamma = _inputs()
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :3] = False
    fk = torch.zeros(2, 2, 19, 5)
    _, sinks = sequence_sinks(k, v, fk, 2, mask)
    P = 4  # the first 4 keys are a prefix
    num, den = exact_window_parts(q[:, :, P:], k, v, gamma, window=5, scale=0.4, key_mask=mask, sinks=sinks, chunk=4)
    ref, _ = hybrid_attention_quadratic(q[:, :, P:], k, v, torch.zeros(2, 4, 15, 5), fk, gamma, window=5, scale=0.4,
                                        key_mask=mask, sinks=sinks, eps=0.0)
    torch.testing.assert_close(num / den[..., None], ref, atol=1e-6, rtol=1e-6)


def test_one_decode_step_over_the_ring_equals_the_whole_call_at_that_position():
    q, k, v, gamma = _inputs(B=1)
    W, n = 5, 13
    ring_k, ring_v = torch.zeros(1, 2, W, 8), torch.zeros(1, 2, W, 8)
    for j in range(n - W + 1, n + 1):
        ring_k[:, :, j % W], ring_v[:, :, j % W] = k[:, :, j], v[:, :, j]
    num, den, _ = exact_window_decode(q[:, :, n], ring_k, ring_v, gamma, torch.tensor([n]), window=W, scale=0.4)
    num_all, den_all = exact_window_parts(q[:, :, : n + 1], k[:, :, : n + 1], v[:, :, : n + 1], gamma, window=W,
                                          scale=0.4)
    torch.testing.assert_close(num, num_all[:, :, n], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(den, den_all[:, :, n], atol=1e-6, rtol=1e-6)
