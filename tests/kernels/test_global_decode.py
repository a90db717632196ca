"""The fused Triton decode step over the sparse global cache (``kernels/hybrid/global_decode.py``) against its
PyTorch reference ``global_cache.global_decode_step``: several consecutive steps from the same buffers, so that keys
leave the window, fill empty slots and replace the weakest members; the output, the ring buffers, the global set
(positions exactly, scores to fp32 rounding) and the state compared after every step. Also the prefill-then-decode
sequence against one parallel pass, the ties, and the backend choice.

Runs on CPU through the Triton interpreter where there is no GPU (``TRITON_INTERPRET=1``, set by the conftests) and
compiled on CUDA tensors where there is one. fp32, tiny sizes (bf16 and CUDA graphs: ``tests/gpu``)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import triton_device, triton_problem

if triton_problem():
    pytest.skip(triton_problem(), allow_module_level=True)

from linearize.kernels.hybrid import global_decode
from linearize.kernels.hybrid.global_cache import (
    empty_global_set,
    global_decode_step,
    hybrid_attention_global,
)
from linearize.kernels.hybrid.naive import NO_SINK
from linearize.kernels.hybrid.sinks import sequence_sinks

DEV = triton_device()
TOL = 1e-5


def _buffers(B, H, Hk, Hs, W, K, d, D, F, *, sinks, seed=0):
    """Random ring buffers and state, a global set with empty slots and (in sequence 1) up to two members, sinks."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    kc, vc, fc = r(B, Hk, W, d), r(B, Hk, W, D), r(B, Hs, W, F).exp()
    S, z = r(B, Hs, F, D).abs(), r(B, Hs, F).abs() * F + 1
    gset = list(empty_global_set(B, Hk, Hs, K, d, D, F, dtype=torch.float32, device="cpu"))
    if B > 1:  # members in sequence 1's first slots (keys 2 and 1, as many as fit), the other slots empty
        m = min(K, 2)
        gset[0][1, :, :m], gset[1][1, :, :m], gset[2][1, :, :m] = r(Hk, m, d), r(Hk, m, D), r(Hs, m, F).exp()
        gset[3][1, :, :m] = torch.tensor([2, 1][:m])
        gset[4][1, :, :m] = r(Hk, m).abs() * 4
    sk = None
    if sinks:  # sequence 0: key 1 and an empty slot; the others: keys 0 and 7 (passed by the steps below)
        spos = torch.tensor([[1, NO_SINK]] + [[0, 7]] * (B - 1))
        sk = (r(B, Hk, 2, d), r(B, Hk, 2, D), spos)
    pos = torch.tensor([0, 6, 3][:B])
    return {"k_cache": kc, "v_cache": vc, "fk_cache": fc, "state": (S, z), "global_set": tuple(gset), "pos": pos}, sk


def _copy(buf, dev=DEV):
    c = lambda x: x.clone().to(dev)
    return {name: tuple(map(c, x)) if isinstance(x, tuple) else c(x) for name, x in buf.items()}


def _same_set(ref, got, step):
    names = ("k", "v", "fk", "pos", "score")
    for name, a, b in zip(names, ref, got):
        b = b.cpu()
        if name == "pos":
            assert torch.equal(a, b), f"step {step}: positions {b.tolist()} != reference {a.tolist()}"
        elif name == "score":  # the recall errors are sums in another order: equal to fp32 rounding
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"step {step}: empty slots differ"
            fin = torch.isfinite(a)
            torch.testing.assert_close(b[fin], a[fin], atol=0, rtol=1e-6, msg=f"step {step}: scores")
        else:  # copies of the leaving key: bit for bit
            assert torch.equal(a, b), f"step {step}: global set {name} differs"


def _replacements(before, after):
    """Slots that held a member before the step and another one after it."""
    return int((torch.isfinite(before[4]) & (before[3] != after[3])).sum())


def _run_both(B, H, Hk, Hs, W, K, *, sinks, linear, steps, d=8, D=8, F=6, seed=0):
    """``steps`` steps of both backends from the same buffers, compared after each; returns the replacements seen."""
    buf, sk = _buffers(B, H, Hk, Hs, W, K, d, D, F, sinks=sinks, seed=seed)
    ref, tri = _copy(buf, "cpu"), _copy(buf)
    sk_dev = None if sk is None else tuple(x.to(DEV) for x in sk)
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s: torch.randn(*s, generator=g)
    gamma = torch.rand(H, generator=g) * 0.8 + 0.1
    replaced = 0
    for step in range(steps):
        q, k, v, fq, fk = r(B, H, 1, d), r(B, Hk, 1, d), r(B, Hk, 1, D), r(B, H, 1, F).exp(), r(B, Hs, 1, F).exp()
        before = tuple(x.clone() for x in ref["global_set"])
        o_ref = global_decode_step(q, k, v, fq, fk, gamma, window=W, scale=0.35, sinks=sk, linear=linear, **ref)
        o_tri = global_decode_step(*(x.to(DEV) for x in (q, k, v, fq, fk, gamma)), window=W, scale=0.35,
                                   sinks=sk_dev, linear=linear, backend="triton", **tri)
        replaced += _replacements(before, ref["global_set"])
        torch.testing.assert_close(o_tri.cpu(), o_ref, atol=TOL, rtol=TOL, msg=f"step {step}: o")
        for name in ("k_cache", "v_cache", "fk_cache"):
            assert torch.equal(tri[name].cpu(), ref[name]), f"step {step}: {name} differs"
        _same_set(ref["global_set"], tri["global_set"], step)
        for name, a, b in zip("Sz", ref["state"], tri["state"]):
            torch.testing.assert_close(b.cpu(), a, atol=TOL, rtol=TOL, msg=f"step {step}: {name}")
        ref["pos"] += 1
        tri["pos"] += 1
    return replaced


HEADS = {"mha": (2, 2, 2), "gqa-Hs=Hk": (4, 2, 2), "gqa-Hs=H": (4, 2, 4), "one-kv-head": (3, 1, 1)}


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "exact-only"])
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_triton_step_matches_torch_step(heads, sinks, linear):
    """W 4, K 3, three sequences at positions 0, 6 and 3: keys leave the window, fill the empty slots, replace
    members; a sink leaves the window without entering."""
    H, Hk, Hs = HEADS[heads]
    replaced = _run_both(3, H, Hk, Hs, 4, 3, sinks=sinks, linear=linear, steps=9)
    assert replaced > 0, "no member was replaced: the test does not exercise eviction"


@pytest.mark.parametrize("W,K", [(1, 2), (2, 1), (5, 4)])
def test_triton_step_window_and_budget_edges(W, K):
    """W 1 (the leaving key is the new one, same ring slot), K 1, K larger than the steps fill."""
    _run_both(2, 4, 2, 4, W, K, sinks=True, linear=True, steps=7, d=5, D=7, F=3, seed=3)


def test_ties_keep_the_later_key():
    """Zero features: the state recalls nothing and every key scores ||v||^2 = d exactly, so only the tie rule
    orders them: the latest keys stay (as in the parallel form's test of the same rule)."""
    B, H, Hk, Hs, W, K, d, F = 1, 2, 1, 1, 3, 4, 4, 3
    ones, zeros = torch.ones(B, Hk, 1, d), torch.zeros(B, Hs, 1, F)
    outs = {}
    for backend in ("torch", "triton"):
        dev = DEV if backend == "triton" else "cpu"
        st = (torch.zeros(B, Hs, F, d, device=dev), torch.zeros(B, Hs, F, device=dev))
        caches = {"k_cache": torch.zeros(B, Hk, W, d, device=dev), "v_cache": torch.zeros(B, Hk, W, d, device=dev),
                  "fk_cache": torch.zeros(B, Hs, W, F, device=dev)}
        gset = empty_global_set(B, Hk, Hs, K, d, d, F, dtype=torch.float32, device=dev)
        pos = torch.zeros(B, dtype=torch.long, device=dev)
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            q, k = torch.randn(B, H, 1, d, generator=g), torch.randn(B, Hk, 1, d, generator=g)
            fq = torch.rand(B, H, 1, F, generator=g)
            global_decode_step(*(x.to(dev) for x in (q, k, ones, fq, zeros, torch.full((H,), 0.5))), state=st,
                               pos=pos, window=W, scale=0.5, global_set=gset, backend=backend, **caches)
            pos += 1
        outs[backend] = gset
    assert sorted(outs["triton"][3][0, 0].tolist()) == [6, 7, 8, 9]  # keys 0..9 left the window: the latest four
    assert torch.equal(outs["triton"][3].cpu(), outs["torch"][3])
    assert (outs["triton"][4] == d).all()


def _prefill_then_decode(q, k, v, fq, fk, gamma, *, window, budget, n, sinks=None, backend="triton"):
    """Parallel pass over the first n tokens, then one decode step per token (``tests/kernels/test_global_cache.py``'s
    pattern, on ``DEV`` and with the Triton step)."""
    B, Hk, T, d = k.shape
    W = window
    Hs, F, D = fk.shape[1], fk.shape[-1], v.shape[-1]
    o1, state, gset = hybrid_attention_global(q[:, :, :n], k[:, :, :n], v[:, :, :n], fq[:, :, :n], fk[:, :, :n], gamma,
                                              window=W, scale=0.3, budget=budget, output_final_state=True,
                                              sinks=sinks)
    kc, vc, fc = torch.zeros(B, Hk, W, d), torch.zeros(B, Hk, W, D), torch.zeros(B, Hs, W, F)
    for j in range(max(0, n - W + 1), n):
        kc[:, :, j % W], vc[:, :, j % W], fc[:, :, j % W] = k[:, :, j], v[:, :, j], fk[:, :, j]
    to = lambda x: x.contiguous().to(DEV)
    S, z, kc, vc, fc = map(to, (state[0], state[1], kc, vc, fc))
    gset = tuple(map(to, gset))
    sinks = None if sinks is None else tuple(map(to, sinks))
    pos = torch.full((B,), n, dtype=torch.long, device=DEV)
    outs = [o1]
    for t in range(n, T):
        sl = slice(t, t + 1)
        outs.append(global_decode_step(*(to(x[:, :, sl]) for x in (q, k, v, fq, fk)), to(gamma), state=(S, z),
                                       k_cache=kc, v_cache=vc, fk_cache=fc, pos=pos, window=W, scale=0.3,
                                       global_set=gset, sinks=sinks, backend=backend).cpu())
        pos += 1
    return torch.cat(outs, 2)


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
def test_prefill_then_triton_decode_equals_one_parallel_pass(sinks):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    B, H, Hk, Hs, T, d, F = 2, 4, 2, 2, 18, 8, 6
    q, k, v, fq, fk = r(B, H, T, d), r(B, Hk, T, d), r(B, Hk, T, d), r(B, H, T, F).exp(), r(B, Hs, T, F).exp()
    gamma = torch.rand(H, generator=g) * 0.8 + 0.1
    sk = None
    if sinks:
        fk, sk = sequence_sinks(k, v, fk, 2)
    full, _, _ = hybrid_attention_global(q, k, v, fq, fk, gamma, window=4, scale=0.3, budget=3, sinks=sk)
    steps = _prefill_then_decode(q, k, v, fq, fk, gamma, window=4, budget=3, n=7, sinks=sk)
    # decoding subtracts the members' linear terms from phi(q)^T S, the parallel form sums the non-members
    torch.testing.assert_close(steps, full, atol=5e-5, rtol=1e-4)


def test_backend_choice(monkeypatch):
    """"triton" calls the kernel (on CPU tensors too: here under the interpreter); "torch" never; "auto" only on
    CUDA tensors; an unknown name is refused."""
    calls = []
    real = global_decode.global_decode_step_triton
    monkeypatch.setattr(global_decode, "global_decode_step_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    buf, _ = _buffers(1, 2, 1, 1, 3, 2, 4, 4, 3, sinks=False)
    x = lambda *s: torch.rand(*s, device=DEV)
    args = (x(1, 2, 1, 4), x(1, 1, 1, 4), x(1, 1, 1, 4), x(1, 2, 1, 3), x(1, 1, 1, 3), x(2))
    for backend, expect in (("torch", 0), ("triton", 1), ("auto", 1 if DEV == "cuda" else 0)):
        calls.clear()
        global_decode_step(*args, window=3, scale=0.5, backend=backend, **_copy(buf))
        assert len(calls) == expect, backend
    with pytest.raises(ValueError, match="backend"):
        global_decode_step(*args, window=3, scale=0.5, backend="cuda", **_copy(buf))
