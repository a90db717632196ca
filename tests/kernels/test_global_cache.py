"""The sparse global cache (``kernels/hybrid/global_cache.py``): the blocked parallel form against a brute-force
reading of the definition (query by query, scores and members recomputed from scratch), the one-token decode step
and a split prefill against one parallel pass, the budget, ties and padding. fp32, CPU, small sizes."""

from __future__ import annotations

import pytest
import torch

from linearize.kernels.hybrid.global_cache import (
    empty_global_set,
    global_decode_step,
    hybrid_attention_global,
    recall_errors,
)
from linearize.kernels.hybrid.naive import NO_SINK, hybrid_attention_quadratic
from linearize.kernels.hybrid.sinks import sequence_sinks


def _inputs(B=2, H=4, Hk=2, Hs=2, T=24, d=8, F=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    q, k, v = r(B, H, T, d), r(B, Hk, T, d), r(B, Hk, T, d)
    fq, fk = r(B, H, T, F).exp(), r(B, Hs, T, F).exp()  # positive features, like a softmax feature map
    gamma = torch.rand(H, generator=g) * 0.8 + 0.1
    return q, k, v, fq, fk, gamma


def _brute(q, k, v, fq, fk, gamma, *, window, budget, scale, eps, sinks=None, linear=True):
    """The definition read literally, one query at a time (sinks: (k_s, v_s, pos) with fk already zeroed)."""
    B, H, T, _ = q.shape
    Hk, Hs = k.shape[1], fk.shape[1]
    sink_pos = set() if sinks is None else {int(p) for p in sinks[2][0] if p < NO_SINK}
    out = torch.zeros(B, H, T, v.shape[-1])
    for b in range(B):
        # recall error of every key against the state of every earlier key (sum over the kv head's state heads)
        err = torch.zeros(Hk, T)
        for s in range(Hs):
            kv = s // (Hs // Hk)
            for j in range(T):
                S = sum((torch.outer(fk[b, s, m], v[b, kv, m]) for m in range(j)), torch.zeros(fk.shape[-1], v.shape[-1]))
                z = sum((fk[b, s, m] for m in range(j)), torch.zeros(fk.shape[-1]))
                rec = fk[b, s, j] @ S / (fk[b, s, j] @ z + eps)
                err[kv, j] += (v[b, kv, j] - rec).square().sum()
        for h in range(H):
            kv, st = h // (H // Hk), h // (H // Hs)
            for i in range(T):
                cands = [j for j in range(i - window + 1) if j not in sink_pos]
                ranked = sorted(cands, key=lambda j: (float(err[kv, j]), j), reverse=True)
                members = set(ranked[:budget])
                win = list(range(max(0, i - window + 1), i + 1))
                s_all = (k[b, kv] @ q[b, h, i]) * scale
                c = s_all[win].max()
                exact = win + sorted(members) + [j for j in sink_pos if j <= i - window]
                w = torch.zeros(T)
                w[exact] += gamma[h] * torch.exp(s_all[exact] - c)
                for j in range(i - window + 1):
                    if linear and j not in members and j not in sink_pos:
                        w[j] += fq[b, h, i] @ fk[b, st, j]
                out[b, h, i] = (w @ v[b, kv]) / (w.sum() + eps)
    return out


@pytest.mark.parametrize("window,budget,Hs", [(4, 3, 2), (1, 2, 4), (6, 1, 2), (3, 40, 2)])
def test_parallel_form_matches_the_definition_read_literally(window, budget, Hs):
    q, k, v, fq, fk, gamma = _inputs(T=16, Hs=Hs)
    o, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=window, scale=0.3, budget=budget, eps=1e-6,
                                      block=5)
    ref = _brute(q, k, v, fq, fk, gamma, window=window, budget=budget, scale=0.3, eps=1e-6)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_parallel_form_with_sinks_matches_the_definition():
    q, k, v, fq, fk, gamma = _inputs(T=16)
    fk, sinks = sequence_sinks(k, v, fk, 2)
    o, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=3, scale=0.3, budget=2, sinks=sinks, block=7)
    ref = _brute(q, k, v, fq, fk, gamma, window=3, budget=2, scale=0.3, eps=1e-6, sinks=sinks)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_without_the_linear_part_only_the_exact_part_is_read_and_decode_agrees():
    q, k, v, fq, fk, gamma = _inputs(T=16)
    o, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=3, scale=0.3, budget=2, linear=False, block=6)
    ref = _brute(q, k, v, fq, fk, gamma, window=3, budget=2, scale=0.3, eps=1e-6, linear=False)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    steps, _, _ = _prefill_then_decode(q, k, v, fq, fk, gamma, window=3, budget=2, n=5, linear=False)
    torch.testing.assert_close(steps, o, atol=1e-5, rtol=1e-5)


def test_a_budget_as_large_as_the_sequence_is_exact_softmax_attention():
    q, k, v, fq, fk, gamma = _inputs(T=20)
    o, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=4, scale=0.3, budget=20, eps=0.0)
    kh, vh = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    teacher = torch.nn.functional.scaled_dot_product_attention(q, kh, vh, is_causal=True, scale=0.3)
    torch.testing.assert_close(o, teacher, atol=1e-5, rtol=1e-5)


def test_the_global_cache_only_moves_keys_from_the_linear_to_the_exact_part():
    """Where no key has left the window yet the output is the plain hybrid one; the members' recall is what
    changes later (and with an empty state, every key is recalled equally badly: ||v||^2)."""
    q, k, v, fq, fk, gamma = _inputs(T=20)
    o, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=8, scale=0.3, budget=2)
    plain, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=8, scale=0.3)
    torch.testing.assert_close(o[:, :, :8], plain[:, :, :8], atol=1e-6, rtol=1e-6)
    assert (o[:, :, 9:] - plain[:, :, 9:]).abs().max() > 1e-3
    err = recall_errors(fk, v)
    torch.testing.assert_close(err[:, :, 0], v[:, :, 0].square().sum(-1))


def _prefill_then_decode(q, k, v, fq, fk, gamma, *, window, budget, n, sinks=None, linear=True):
    """Parallel pass over the first n tokens, then one decode step per token, with a ring of W slots."""
    B, Hk, T, d = k.shape
    W = window
    Hs, F, D = fk.shape[1], fk.shape[-1], v.shape[-1]
    o1, state, gset = hybrid_attention_global(q[:, :, :n], k[:, :, :n], v[:, :, :n], fq[:, :, :n], fk[:, :, :n], gamma,
                                              window=W, scale=0.3, budget=budget, output_final_state=True,
                                              sinks=sinks, linear=linear)
    kc, vc, fc = torch.zeros(B, Hk, W, d), torch.zeros(B, Hk, W, D), torch.zeros(B, Hs, W, F)
    for j in range(max(0, n - W + 1), n):
        kc[:, :, j % W], vc[:, :, j % W], fc[:, :, j % W] = k[:, :, j], v[:, :, j], fk[:, :, j]
    S, z = state[0].contiguous(), state[1].contiguous()
    pos = torch.full((B,), n, dtype=torch.long)
    outs = [o1]
    for t in range(n, T):
        sl = slice(t, t + 1)
        outs.append(global_decode_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gamma,
                                       state=(S, z), k_cache=kc, v_cache=vc, fk_cache=fc, pos=pos, window=W,
                                       scale=0.3, global_set=gset, sinks=sinks, linear=linear))
        pos += 1
    return torch.cat(outs, 2), (S, z), gset


@pytest.mark.parametrize("window,budget,n", [(4, 3, 9), (3, 2, 1), (5, 1, 12), (2, 30, 6)])
def test_prefill_then_decode_equals_one_parallel_pass(window, budget, n):
    q, k, v, fq, fk, gamma = _inputs(T=26)
    full, state, _gset = hybrid_attention_global(q, k, v, fq, fk, gamma, window=window, scale=0.3, budget=budget,
                                                output_final_state=True)
    steps, state2, gset2 = _prefill_then_decode(q, k, v, fq, fk, gamma, window=window, budget=budget, n=n)
    # decoding reads phi(q)^T S minus the members' linear terms, the parallel form sums the non-members: the same
    # numbers in another order; with every key a member (budget 30) the subtraction cancels almost all of S (2e-5)
    torch.testing.assert_close(steps, full, atol=5e-5, rtol=1e-4)
    # decoding folds the key leaving the window after its read: one key more than the parallel final state
    for a, b in zip(state2, state):
        assert a.shape == b.shape
    members = lambda g: {(b, h, int(p)) for b, h, s in zip(*torch.nonzero(torch.isfinite(g[4]), as_tuple=True))
                         for p in [g[3][b, h, s]]}
    assert len(members(gset2)) <= 2 * 2 * budget


def test_decode_with_sinks_equals_one_parallel_pass():
    q, k, v, fq, fk, gamma = _inputs(T=22)
    fk, sinks = sequence_sinks(k, v, fk, 2)
    full, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=4, scale=0.3, budget=3, sinks=sinks)
    steps, _, _ = _prefill_then_decode(q, k, v, fq, fk, gamma, window=4, budget=3, n=7, sinks=sinks)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [5, 11, 17])
def test_two_calls_with_the_carried_state_and_set_equal_one_call(split):
    W, K = 4, 3
    q, k, v, fq, fk, gamma = _inputs(T=24)
    full, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=W, scale=0.3, budget=K)
    o1, state, gset = hybrid_attention_global(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq[:, :, :split],
                                              fk[:, :, :split], gamma, window=W, scale=0.3, budget=K,
                                              output_final_state=True)
    p = min(W - 1, split)  # the cached window keys lead the second call
    off = split - p
    gk, gv, gfk, gpos, gscore = gset
    gpos = torch.where(torch.isfinite(gscore), gpos - off, gpos)
    o2, _, _ = hybrid_attention_global(q[:, :, split:], k[:, :, off:], v[:, :, off:], fq[:, :, split:], fk[:, :, off:],
                                       gamma, window=W, scale=0.3, budget=K, initial_state=state,
                                       initial_global=(gk, gv, gfk, gpos, gscore))
    torch.testing.assert_close(torch.cat([o1, o2], 2), full, atol=1e-5, rtol=1e-5)


def test_the_set_never_exceeds_its_budget_and_ties_keep_the_later_key():
    B, Hk, Hs, T, d, F = 1, 1, 1, 12, 4, 3
    v = torch.ones(B, Hk, T, d)  # every key recalled equally badly from an empty state: all scores tie at first
    fk = torch.zeros(B, Hs, T, F)  # zero features: the state stays empty, every score is ||v||^2 = 4
    q, k, fq = torch.randn(B, 2, T, d), torch.randn(B, Hk, T, d), torch.rand(B, 2, T, F)
    _, _, gset = hybrid_attention_global(q, k, v, fq, fk, torch.full((2,), 0.5), window=3, scale=0.5, budget=4,
                                         output_final_state=True)
    pos = gset[3][0, 0]
    assert torch.isfinite(gset[4]).all() and gset[4].numel() == 4
    assert sorted(pos.tolist()) == [6, 7, 8, 9]  # keys 0..9 have left the window; ties keep the latest four


def test_left_padding_gives_the_unpadded_result():
    W, K, pad = 3, 2, 4
    q, k, v, fq, fk, gamma = _inputs(B=1, T=14)
    o, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=W, scale=0.3, budget=K)
    zpad = lambda x: torch.cat([torch.randn(*x.shape[:2], pad, x.shape[-1]), x], 2)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 14, dtype=torch.bool)], 1)
    # padding is invisible: positions shift, so compare against the unpadded call shifted by pad in the window
    o_p, _, _ = hybrid_attention_global(zpad(q), zpad(k), zpad(v), zpad(fq), zpad(fk).abs(), gamma, window=W + pad,
                                        scale=0.3, budget=K, key_mask=mask)
    ref, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=W + pad, scale=0.3, budget=K)
    torch.testing.assert_close(o_p[:, :, pad:], ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(o, ref)


def test_gradients_equal_the_definition_read_literally():
    leaves = [x.clone().requires_grad_() for x in _inputs(T=12)]
    o, _, _ = hybrid_attention_global(*leaves, window=3, scale=0.3, budget=2, block=5)
    ref = _brute(*leaves, window=3, budget=2, scale=0.3, eps=1e-6)
    w = torch.randn_like(o)
    got = torch.autograd.grad((o * w).sum(), leaves)
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "fq", "fk", "gamma"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_gradients_flow_and_do_not_depend_on_the_query_block():
    leaves = [x.clone().requires_grad_() for x in _inputs(T=18)]
    grads = []
    for block in (4, 64):
        o, _, _ = hybrid_attention_global(*leaves, window=3, scale=0.3, budget=2, block=block)
        grads.append(torch.autograd.grad(o.square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_an_empty_set_and_the_decode_step_keep_their_shapes():
    gset = empty_global_set(2, 3, 3, 5, 8, 8, 6, dtype=torch.float32, device="cpu")
    assert [tuple(t.shape) for t in gset] == [(2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 6), (2, 3, 5), (2, 3, 5)]
    assert (gset[3] == NO_SINK).all() and torch.isinf(gset[4]).all()
