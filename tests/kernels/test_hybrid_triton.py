"""Fused Triton hybrid attention (chunked fwd + bwd, decode step) against the fp32 PyTorch references.

Runs on CPU through the Triton interpreter where there is no GPU (``TRITON_INTERPRET=1``, set by the conftests
before triton is imported) and compiled on CUDA tensors where there is one. Sizes are tiny
because the interpreter is slow; chunk size 16 so every case spans several chunks.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # on a GPU the compiled kernels run on CUDA tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from linearize.kernels import hybrid_attention, hybrid_decode_step, hybrid_decode_step_torch  # noqa: E402
from linearize.kernels.hybrid.naive import hybrid_attention_chunked  # noqa: E402
from tests.kernels.conftest import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = 1e-4

CASES = [
    # (B, H, Hk, Hs, T, P, d, D, F, W, state)
    (1, 2, 2, 2, 40, 0, 16, 16, 16, 16, False),
    (2, 2, 1, 1, 37, 0, 12, 20, 10, 16, True),  # ragged T, odd dims, GQA with Hs = Hk < H
    (1, 4, 2, 4, 33, 0, 16, 16, 16, 32, True),  # GQA with Hs = H (state per query head)
    (1, 2, 1, 1, 20, 0, 16, 16, 16, 32, True),  # W >= T
    (2, 2, 1, 2, 45, 0, 16, 24, 16, 0, True),  # pure linear
    (1, 2, 2, 2, 21, 13, 16, 16, 16, 16, True),  # prefix P < W (prefill after a cached window)
    (1, 2, 1, 1, 19, 40, 16, 16, 8, 16, True),  # prefix P > W: part of the prefix is folded up front
    (1, 1, 1, 1, 24, 0, 16, 80, 8, 16, True),  # D > 64: two D blocks
    (1, 1, 1, 1, 17, 0, 16, 16, 130, 16, False),  # F > 128 (BF = 256, narrow D blocks)
]


def _ids(c):
    B, H, Hk, Hs, T, P, d, D, F, W, st = c
    return f"B{B}-H{H}-Hk{Hk}-Hs{Hs}-T{T}-P{P}-d{d}-D{D}-F{F}-W{W}" + ("-state" if st else "")


def _inputs(B, H, Hk, Hs, T, P, d, D, F, W, state, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = T + P
    mk = lambda fn, *s: fn(*s, generator=g).to(DEV).requires_grad_()  # noqa: E731
    x = dict(q=mk(torch.randn, B, H, T, d), k=mk(torch.randn, B, Hk, Tk, d), v=mk(torch.randn, B, Hk, Tk, D),
             fq=mk(torch.rand, B, H, T, F), fk=mk(torch.rand, B, Hs, Tk, F), gamma=mk(torch.rand, H))
    if W == 0:
        x.update(q=None, k=None, gamma=None)
    st = (mk(torch.rand, B, Hs, F, D), mk(torch.rand, B, Hs, F)) if state else None
    return x, st


def _run(fn, x, st, W, d):
    o, (S, z) = fn(x["q"], x["k"], x["v"], x["fq"], x["fk"], x["gamma"], window=W, scale=d**-0.5,
                   initial_state=st, output_final_state=True)
    w = torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)
    loss = (o * w).sum() + (S * 0.1).sum() + z.sin().sum()
    names = [n for n, t in x.items() if t is not None] + (["S0", "z0"] if st else [])
    leaves = [t for t in x.values() if t is not None] + (list(st) if st else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {"o": o, "S": S, "z": z, **{f"d{n}": gr for n, gr in zip(names, grads)}}


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_chunked_fwd_bwd_matches_naive(case):
    x, st = _inputs(*case)
    W, d = case[9], case[6]
    ref = _run(hybrid_attention_chunked, x, st, W, d)
    got = _run(lambda *a, **k: hybrid_attention(*a, backend="triton", **k), x, st, W, d)
    for key in ref:
        assert_close(key, ref[key], got[key], TOL)


SUPERCHUNK_CASES = [
    # (case, chunk_size, sub_chunks): several superchunks (the chunk-parallel path), ragged last superchunk
    ((2, 4, 1, 1, 75, 0, 16, 16, 16, 16, True), 16, 1),  # 5 superchunks of one chunk, GQA Hs = Hk < H
    ((1, 4, 2, 4, 75, 0, 16, 24, 12, 32, True), 16, 2),  # 3 superchunks of two chunks (last one ragged), Hs = H
    ((2, 2, 1, 2, 70, 0, 16, 80, 16, 0, True), 16, 2),  # pure linear, two D blocks
    ((1, 2, 1, 1, 50, 40, 16, 16, 8, 16, True), 16, 1),  # prefix P > W
]


@pytest.mark.parametrize("case,chunk,nsub", SUPERCHUNK_CASES, ids=[f"{_ids(c)}-C{ch}-n{n}" for c, ch, n in SUPERCHUNK_CASES])
def test_superchunk_parallel_matches_naive(case, chunk, nsub):
    from linearize.kernels.hybrid.chunk import hybrid_attention_triton

    x, st = _inputs(*case)
    W, d = case[9], case[6]
    ref = _run(hybrid_attention_chunked, x, st, W, d)
    got = _run(lambda *a, **k: hybrid_attention_triton(*a, chunk_size=chunk, sub_chunks=nsub, **k), x, st, W, d)
    for key in ref:
        assert_close(key, ref[key], got[key], TOL)


def test_superchunk_no_final_state():
    """Several superchunks and no final state requested: the prefix states still come from passes 1 and 2."""
    from linearize.kernels.hybrid.chunk import hybrid_attention_triton

    x, st = _inputs(1, 2, 1, 1, 70, 0, 16, 16, 16, 16, True)
    ref, _ = hybrid_attention_chunked(*x.values(), window=16, scale=0.25, initial_state=st)
    got, state = hybrid_attention_triton(*x.values(), window=16, scale=0.25, initial_state=st, chunk_size=16,
                                         sub_chunks=1)
    assert state is None
    assert_close("o", ref, got, TOL)
    w = torch.linspace(-1, 1, ref.numel(), device=ref.device).view_as(ref)
    leaves = [t for t in x.values()] + list(st)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    g_got = torch.autograd.grad((got * w).sum(), leaves)
    for i, (a, b) in enumerate(zip(g_ref, g_got)):
        assert_close(f"grad{i}", a, b, TOL)


def test_forward_without_final_state():
    x, st = _inputs(1, 2, 1, 1, 20, 0, 16, 16, 16, 16, True)
    with torch.no_grad():
        ref, _ = hybrid_attention_chunked(*x.values(), window=16, scale=0.25, initial_state=st)
        got, state = hybrid_attention(*x.values(), window=16, scale=0.25, initial_state=st, backend="triton")
    assert state is None
    assert_close("o", ref, got, TOL)


def test_key_mask_falls_back_to_torch():
    x, _ = _inputs(1, 2, 1, 1, 20, 0, 16, 16, 16, 16, False)
    km = torch.ones(1, 20, dtype=torch.bool, device=DEV)
    km[:, :3] = False
    with torch.no_grad():
        ref, _ = hybrid_attention_chunked(*x.values(), window=16, scale=0.25, key_mask=km)
        got, _ = hybrid_attention(*x.values(), window=16, scale=0.25, key_mask=km, backend="triton")
    assert_close("o", ref, got, TOL)


DECODE_CASES = [
    # (B, H, Hk, Hs, d, D, F, W, prefill lengths per batch, steps)
    (2, 2, 1, 1, 16, 16, 16, 16, (5, 18), 4),  # GQA, one sequence still filling its window
    (1, 4, 2, 4, 16, 24, 12, 16, (20,), 3),  # Hs = H > Hk, odd D / F
    (2, 2, 2, 2, 16, 16, 16, 0, (3, 9), 3),  # pure linear
]


def _decode_ids(c):
    B, H, Hk, Hs, d, D, F, W, ns, steps = c
    return f"B{B}-H{H}-Hk{Hk}-Hs{Hs}-D{D}-F{F}-W{W}-prefill{'_'.join(map(str, ns))}-steps{steps}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[_decode_ids(c) for c in DECODE_CASES])
def test_decode_step_matches_full_pass(case, backend):
    """Prefill (naive) of n_b tokens, then ``steps`` decode steps == one naive pass over all tokens."""
    B, H, Hk, Hs, d, D, F, W, ns, steps = case
    L = max(ns) + steps
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(B, H, L, d, generator=g), torch.randn(B, Hk, L, d, generator=g), torch.randn(B, Hk, L, D, generator=g)
    fq, fk, gamma = torch.rand(B, H, L, F, generator=g), torch.rand(B, Hs, L, F, generator=g), torch.rand(H, generator=g)
    S0, z0 = torch.rand(B, Hs, F, D, generator=g), torch.rand(B, Hs, F, generator=g)
    scale = d**-0.5
    Wc = max(W, 1)
    # ring caches start as finite garbage: slots outside the window must not matter
    k_cache, v_cache, fk_cache = torch.randn(B, Hk, Wc, d), torch.randn(B, Hk, Wc, D), torch.rand(B, Hs, Wc, F)
    S, z = torch.empty(B, Hs, F, D), torch.empty(B, Hs, F)
    q, k, v, fq, fk, gamma, S0, z0, k_cache, v_cache, fk_cache, S, z = (
        t.to(DEV) for t in (q, k, v, fq, fk, gamma, S0, z0, k_cache, v_cache, fk_cache, S, z))
    refs, ref_states = [], []
    for b, n in enumerate(ns):
        sl = lambda x, a, e: x[b : b + 1, :, a:e]  # noqa: E731
        full, st_full = hybrid_attention_chunked(sl(q, 0, n + steps), sl(k, 0, n + steps), sl(v, 0, n + steps),
                                                 sl(fq, 0, n + steps), sl(fk, 0, n + steps), gamma, window=W,
                                                 scale=scale, initial_state=(S0[b : b + 1], z0[b : b + 1]),
                                                 output_final_state=True)
        refs.append(full[:, :, n:])
        ref_states.append(st_full)
        _, (Sb, zb) = hybrid_attention_chunked(sl(q, 0, n), sl(k, 0, n), sl(v, 0, n), sl(fq, 0, n), sl(fk, 0, n),
                                               gamma, window=W, scale=scale, initial_state=(S0[b : b + 1], z0[b : b + 1]),
                                               output_final_state=True)
        S[b], z[b] = Sb[0], zb[0]
        for j in range(max(0, n - W + 1), n):  # the last W - 1 keys go to their ring slots
            k_cache[b, :, j % Wc], v_cache[b, :, j % Wc], fk_cache[b, :, j % Wc] = k[b, :, j], v[b, :, j], fk[b, :, j]
    pos = torch.tensor(ns, dtype=torch.int64, device=DEV)
    step = hybrid_decode_step if backend == "triton" else (lambda *a, backend, **kw: hybrid_decode_step_torch(*a, **kw))
    caches = (k_cache, v_cache, fk_cache) if W > 0 else (None, None, None)
    for s in range(steps):
        at = lambda x: torch.stack([x[b, :, n + s] for b, n in enumerate(ns)])[:, :, None]  # noqa: E731
        o = step(at(q), at(k), at(v), at(fq), at(fk), gamma, state=(S, z), k_cache=caches[0], v_cache=caches[1],
                 fk_cache=caches[2], pos=pos, window=W, scale=scale, backend=backend)
        for b in range(B):
            assert_close(f"o[b={b}, step {s}]", refs[b][0, :, s], o[b, :, 0], TOL)
        pos += 1
    for b in range(B):
        assert_close(f"S[b={b}]", ref_states[b][0][0], S[b], TOL)
        assert_close(f"z[b={b}]", ref_states[b][1][0], z[b], TOL)


def test_decode_out_buffer_and_repeat_calls():
    """``out=`` receives the output (same values as a fresh allocation); non-contiguous inputs are copied; a changed
    shape after a cached signature is still validated."""
    B, H, Hk, Hs, d, D, F, W = 2, 4, 2, 2, 16, 16, 16, 8
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(B, H, 1, d), r(B, Hk, 1, d), r(B, Hk, 1, D)
    fq, fk, gamma = torch.rand(B, H, 1, F, generator=g), torch.rand(B, Hs, 1, F, generator=g), torch.rand(H, generator=g)
    S, z = torch.rand(B, Hs, F, D, generator=g), torch.rand(B, Hs, F, generator=g)
    kc, vc, fc = r(B, Hk, W, d), r(B, Hk, W, D), torch.rand(B, Hs, W, F, generator=g)
    q, k, v, fq, fk, gamma, S, z, kc, vc, fc = (t.to(DEV) for t in (q, k, v, fq, fk, gamma, S, z, kc, vc, fc))
    pos = torch.tensor([11, 3], device=DEV)
    results = []
    for backend, use_out in (("torch", False), ("triton", False), ("triton", True)):
        st = (S.clone(), z.clone())
        caches = (kc.clone(), vc.clone(), fc.clone())
        out = torch.full((B, H, 1, D), float("nan"), device=DEV) if use_out else None
        q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous view
        o = hybrid_decode_step(q_nc, k, v, fq, fk, gamma, state=st, k_cache=caches[0], v_cache=caches[1],
                               fk_cache=caches[2], pos=pos, window=W, scale=d**-0.5, backend=backend, out=out)
        if use_out:
            assert o.data_ptr() == out.data_ptr()
        results.append((o, st, caches))
    for o, st, caches in results[1:]:
        assert_close("o", results[0][0], o, TOL)
        assert_close("S", results[0][1][0], st[0], TOL)
        assert_close("z", results[0][1][1], st[1], TOL)
        for a, b in zip(results[0][2], caches):
            assert_close("cache", a, b, TOL)
    with pytest.raises(ValueError):
        hybrid_decode_step(q, k, v, fq, fk, gamma, state=(S, z), k_cache=kc[:, :, :4].contiguous(), v_cache=vc,
                           fk_cache=fc, pos=pos, window=W, scale=d**-0.5, backend="triton")



@pytest.mark.parametrize("qkv, features", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32-qkv-bf16-features", "bf16-qkv-fp32-features"])
def test_mixed_input_dtypes_run_in_the_widest(qkv, features):
    """bf16 q/k/v with fp32 feature maps (an fp32 model under bf16 autocast, or feature maps trained in fp32) failed
    in the kernels' dots ("Both operands must be same dtype"); the launcher now promotes every input to the widest
    dtype, so the result equals the reference on those promoted inputs, returned in v's dtype."""
    g = torch.Generator().manual_seed(3)
    B, H, T, d, F, W = 1, 2, 40, 16, 16, 16
    q, k, v = (torch.randn(B, H, T, d, generator=g).to(DEV, qkv).requires_grad_() for _ in range(3))
    fq, fk = (torch.rand(B, H, T, F, generator=g).to(DEV, features).requires_grad_() for _ in range(2))
    gamma = torch.full((H,), 0.7, device=DEV)
    o, (S, z) = hybrid_attention(q, k, v, fq, fk, gamma, window=W, scale=d**-0.5, output_final_state=True,
                                 backend="triton")
    assert o.dtype == qkv
    wide = [x.detach().float().requires_grad_() for x in (q, k, v, fq, fk)]
    ref, (S_ref, z_ref) = hybrid_attention_chunked(*wide, gamma, window=W, scale=d**-0.5, output_final_state=True)
    assert_close("o", ref.to(qkv).float(), o.float(), 1e-4 if qkv == torch.float32 else 1e-2)
    assert_close("S", S_ref, S, 1e-4)
    assert_close("z", z_ref, z, 1e-4)
    o.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == x.dtype for x in (q, k, v, fq, fk))
