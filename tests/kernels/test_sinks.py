"""Attention sinks in every form: the three PyTorch references agree (outputs, states, gradients), the fused Triton
chunk kernel (through ``sinks.add_sinks``) and both decode steps match them, and a prefill + decode steps equal one
pass over the whole sequence. Triton runs on CPU under the interpreter (``TRITON_INTERPRET=1``) at tiny sizes."""

from __future__ import annotations

import pytest
import torch

from linearize.kernels import (
    NO_SINK,
    hybrid_attention,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    hybrid_decode_step,
)
from linearize.kernels.hybrid.sinks import new_sink_slots, sequence_sinks
from tests.conftest import triton_device, triton_problem
from tests.kernels.conftest import assert_close

HAS_TRITON = triton_problem() is None
DEV = triton_device()

CASES = [
    # (B, H, Hk, Hs, T, P, d, D, F, W, E, state, mask)
    (2, 2, 2, 2, 37, 0, 8, 12, 6, 8, 4, False, False),
    (1, 4, 2, 2, 50, 0, 8, 8, 5, 16, 3, True, False),  # GQA, state per kv head
    (2, 4, 1, 4, 23, 11, 8, 8, 4, 8, 4, True, True),  # cached prefix, padding, state per query head
    (1, 2, 1, 1, 20, 5, 8, 8, 4, 64, 2, True, True),  # W >= Tk: no sink ever leaves the window
    (1, 3, 3, 3, 1, 15, 8, 8, 4, 6, 4, True, False),  # one query after a cached window (decode shape)
]


def _ids(c):
    B, H, Hk, Hs, T, P, d, D, F, W, E, st, m = c
    return f"B{B}-H{H}-Hk{Hk}-Hs{Hs}-T{T}-P{P}-W{W}-E{E}" + ("-state" if st else "") + ("-mask" if m else "")


def _inputs(B, H, Hk, Hs, T, P, d, D, F, W, E, state, mask, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    Tk = T + P
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(dev).requires_grad_()  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64).float().to(dev).requires_grad_()  # noqa: E731
    x = dict(q=r(B, H, T, d), k=r(B, Hk, Tk, d), v=r(B, Hk, Tk, D), fq=u(B, H, T, F), fk=u(B, Hs, Tk, F),
             gamma=u(H), k_s=r(B, Hk, E, d), v_s=r(B, Hk, E, D))
    # sink positions in this call's key index: some before the keys (negative: a cached prefix of a longer
    # sequence), some inside, one empty slot
    pos = torch.randint(-30, Tk, (B, E), generator=g)
    pos[:, -1] = NO_SINK
    kw = dict(window=W, scale=d**-0.5, output_final_state=True)
    if state:
        kw["initial_state"] = (u(B, Hs, F, D), u(B, Hs, F))
    if mask:
        km = torch.rand(B, Tk, generator=g) > 0.3
        km[:, -1] = True
        kw["key_mask"] = km.to(dev)
    return x, pos.to(dev), kw


def _run(fn, x, pos, kw):
    o, (S, z) = fn(x["q"], x["k"], x["v"], x["fq"], x["fk"], x["gamma"], sinks=(x["k_s"], x["v_s"], pos), **kw)
    w = torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)
    loss = (o * w).sum() + S.sum() * 0.1 + z.sum() * 0.1
    leaves = list(x.values()) + list(kw.get("initial_state", ()))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = list(x) + (["S0", "z0"] if "initial_state" in kw else [])
    return {"o": o, "S": S, "z": z, **{f"d{n}": gr for n, gr in zip(names, grads)}}


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_references_agree_with_sinks(case):
    x, pos, kw = _inputs(*case)
    quad = _run(hybrid_attention_quadratic, x, pos, kw)
    without = hybrid_attention_quadratic(*(x[n] for n in ("q", "k", "v", "fq", "fk", "gamma")), **kw)[0]
    if case[9] < case[4] + case[5]:  # some sink leaves the window: the sinks change the output
        assert (quad["o"] - without).abs().max() > 1e-3
    for name, fn in [("chunked", lambda *a, **k: hybrid_attention_chunked(*a, chunk_size=16, **k)),
                     ("recurrent", hybrid_attention_recurrent)]:
        got = _run(fn, x, pos, kw)
        for key in quad:
            assert_close(f"{name}:{key}", quad[key], got[key], 1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason=triton_problem() or "")
@pytest.mark.parametrize("case", [c for c in CASES if not c[-1]], ids=[_ids(c) for c in CASES if not c[-1]])
def test_triton_chunk_with_sinks_matches_reference(case):
    x, pos, kw = _inputs(*case, dev=DEV)
    ref = _run(hybrid_attention_quadratic, x, pos, kw)
    got = _run(lambda *a, **k: hybrid_attention(*a, backend="triton", **k), x, pos, kw)
    for key in ref:
        assert_close(f"triton:{key}", ref[key], got[key], 1e-4)


def test_sink_scores_far_above_the_window_stay_finite():
    """A sink whose score exceeds the window's max by far more than exp's fp32 range: the result stays finite and
    equal to the softmax over the sink alone (the window terms and the linear part vanish next to it)."""
    B, H, T, d, D, F, W = 1, 1, 12, 4, 4, 3, 4
    q = torch.ones(B, H, T, d)
    k = torch.zeros(B, H, T, d)
    v = torch.randn(B, H, T, D)
    k_s, v_s = torch.full((B, H, 1, d), 60.0), torch.randn(B, H, 1, D)
    fq, fk = torch.rand(B, H, T, F), torch.rand(B, H, T, F)
    gamma = torch.tensor([0.5])
    pos = torch.zeros(B, 1, dtype=torch.long)
    from linearize.kernels.hybrid.sinks import add_sinks

    o0 = torch.zeros(B, H, T, D)
    out = add_sinks(o0, torch.ones(B, H, T), torch.zeros(B, H, T), q, (k_s, v_s, pos), gamma, scale=1.0, window=W,
                    first_query=0)
    assert torch.isfinite(out).all()
    assert_close("sink-dominated rows", v_s[0, 0, 0].expand(T - W, D), out[0, 0, W:], 1e-6)
    assert_close("rows before the sink leaves the window", o0[0, 0, :W], out[0, 0, :W], 1e-6)
    del k, v, fq, fk


def test_sequence_sinks_pick_the_first_real_tokens():
    B, Hk, Tk, d = 2, 1, 10, 2
    k = torch.arange(B * Tk * d, dtype=torch.float).view(B, Hk, Tk, d)
    v = k + 0.5
    fk = torch.ones(B, Hk, Tk, 3)
    fk0, (k_s, v_s, pos) = sequence_sinks(k, v, fk, 3)
    assert pos.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert fk0[:, :, :3].abs().max() == 0 and bool((fk0[:, :, 3:] == 1).all())
    assert torch.equal(k_s, k[:, :, :3]) and torch.equal(v_s, v[:, :, :3])
    mask = torch.ones(B, Tk, dtype=torch.bool)
    mask[1, :4] = False  # row 1 left-padded by 4
    mask[1, 5] = False
    fk1, (k_s, v_s, pos) = sequence_sinks(k, v, fk, 3, key_mask=mask)
    assert pos.tolist() == [[0, 1, 2], [4, 6, 7]]
    assert torch.equal(k_s[1, 0], k[1, 0, [4, 6, 7]])
    assert fk1[1, 0, :, 0].tolist() == [1, 1, 1, 1, 0, 1, 0, 0, 1, 1]
    _, (_, _, pos) = sequence_sinks(k[:, :, :2], v[:, :, :2], fk[:, :, :2], 3)
    assert pos.tolist() == [[0, 1, NO_SINK]] * 2  # a sequence shorter than the sinks leaves slots empty
    slots = new_sink_slots(torch.tensor([[True, True, False, True]]), 4, torch.tensor([2]), 1, 4, k.device)
    assert slots.tolist() == [[2, 3, -1, -1]]


@pytest.mark.parametrize("backend", ["torch", "triton"] if HAS_TRITON else ["torch"])
@pytest.mark.parametrize("W, E, n", [(4, 3, 9), (4, 3, 2), (8, 4, 5)])
def test_prefill_then_decode_with_sinks_equals_one_pass(backend, W, E, n):
    """One chunked pass over L tokens with the first E as sinks == a prefill of n tokens + decode steps, where the
    decoder keeps new sinks out of the state (also when the prompt is shorter than E)."""
    B, H, Hk, Hs, d, D, F, L = 2, 4, 2, 2, 16, 16, 16, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(B, H, L, d, generator=g), torch.randn(B, Hk, L, d, generator=g), torch.randn(B, Hk, L, D, generator=g)
    fq, fk, gamma = torch.rand(B, H, L, F, generator=g), torch.rand(B, Hs, L, F, generator=g), torch.rand(H, generator=g)
    q, k, v, fq, fk, gamma = (t.to(DEV) for t in (q, k, v, fq, fk, gamma))
    scale = d**-0.5
    fk_all, sinks_all = sequence_sinks(k, v, fk, E)
    full, _ = hybrid_attention_chunked(q, k, v, fq, fk_all, gamma, window=W, scale=scale, sinks=sinks_all)
    # prefill
    fk_p, (k_s, v_s, spos) = sequence_sinks(k[:, :, :n], v[:, :, :n], fk[:, :, :n], E)
    o, (S, z) = hybrid_attention_chunked(q[:, :, :n], k[:, :, :n], v[:, :, :n], fq[:, :, :n], fk_p, gamma,
                                         window=W, scale=scale, sinks=(k_s, v_s, spos), output_final_state=True)
    assert_close("prefill", full[:, :, :n], o, 1e-5)
    k_ring, v_ring, fk_ring = (torch.zeros(B, x.shape[1], W, x.shape[-1], device=DEV) for x in (k, v, fk))
    for j in range(max(0, n - W + 1), n):
        k_ring[:, :, j % W], v_ring[:, :, j % W], fk_ring[:, :, j % W] = k[:, :, j], v[:, :, j], fk_p[:, :, j]
    spos = spos.to(torch.int32)
    pos = torch.full((B,), n, dtype=torch.int32, device=DEV)
    for i in range(n, L):
        fk_i = fk[:, :, i : i + 1]
        if i < E:  # this token is a sink: stored as one, kept out of the state
            fk_i = torch.zeros_like(fk_i)
            k_s[:, :, i], v_s[:, :, i], spos[:, i] = k[:, :, i], v[:, :, i], i
        o = hybrid_decode_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], fq[:, :, i : i + 1],
                               fk_i, gamma, state=(S, z), k_cache=k_ring, v_cache=v_ring, fk_cache=fk_ring, pos=pos,
                               window=W, scale=scale, backend=backend, sinks=(k_s, v_s, spos))
        assert_close(f"{backend} step {i}", full[:, :, i : i + 1], o, 1e-4)
        pos += 1


@pytest.mark.skipif(not HAS_TRITON, reason=triton_problem() or "")
def test_triton_chunk_with_sinks_trains_the_feature_maps_alone():
    """Attention transfer's case: q, k, v and the sinks are recorded (no gradient), phi(q), phi(k) and gamma are
    trained. Their gradients through the fused kernel and ``add_sinks`` equal the reference's."""
    x, pos, kw = _inputs(2, 4, 2, 2, 45, 0, 8, 12, 6, 8, 4, False, False, dev=DEV)
    ref = _run(hybrid_attention_quadratic, x, pos, kw)
    wanted = ("fq", "fk", "gamma")
    part = {n: (t if n in wanted else t.detach()) for n, t in x.items()}
    o, (S, z) = hybrid_attention(*(part[n] for n in ("q", "k", "v", "fq", "fk", "gamma")), backend="triton",
                                 sinks=(part["k_s"], part["v_s"], pos), **kw)
    w = torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)
    loss = (o * w).sum() + S.sum() * 0.1 + z.sum() * 0.1
    for n, g in zip(wanted, torch.autograd.grad(loss, [part[n] for n in wanted])):
        assert_close(f"d{n}", ref[f"d{n}"], g, 1e-4)


FUSED_CASES = [
    # (B, H, Hk, T, d, D, E, W, first_query)
    (2, 4, 2, 37, 8, 12, 4, 8, 0),  # GQA, ragged rows
    (1, 2, 2, 70, 16, 80, 3, 16, 9),  # D > 64, a cached prefix before the queries
    (1, 3, 1, 5, 8, 8, 2, 4, 40),  # decode-like: few queries far from the sinks
]


@pytest.mark.skipif(not HAS_TRITON, reason=triton_problem() or "")
@pytest.mark.parametrize("case", FUSED_CASES, ids=[f"B{c[0]}-H{c[1]}-Hk{c[2]}-T{c[3]}-D{c[5]}-E{c[6]}-q0{c[8]}"
                                                   for c in FUSED_CASES])
def test_fused_add_sinks_matches_the_pytorch_form(case):
    from linearize.kernels.hybrid.sinks import add_sinks
    from linearize.kernels.hybrid.sinks_fused import add_sinks_fused

    B, H, Hk, T, d, D, E, W, first = case
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    o, den, c = r(B, H, T, D).requires_grad_(), (r(B, H, T).abs() + 0.5).requires_grad_(), r(B, H, T).requires_grad_()
    gamma = torch.rand(H, generator=g).to(DEV).requires_grad_()
    q, k_s, v_s = r(B, H, T, d), r(B, Hk, E, d) * 2, r(B, Hk, E, D)
    pos = torch.randint(-5, first + T, (B, E), generator=g)
    pos[:, 0] = -2  # one sink every query past the window's start reads (from a cached prefix)
    pos[0, -1] = NO_SINK
    pos = pos.to(DEV)
    w = r(B, H, T, D)
    kw = dict(scale=d**-0.5, window=W, first_query=first)
    ref = add_sinks(o, den, c, q, (k_s, v_s, pos), gamma, **kw)
    got = add_sinks_fused(o, den, c, q, (k_s, v_s, pos), gamma, **kw)
    assert_close("out", ref, got, 1e-5)
    leaves = [o, den, c, gamma]
    for name, a, b in zip(("do", "dden", "dc", "dgamma"), torch.autograd.grad((ref * w).sum(), leaves),
                          torch.autograd.grad((got * w).sum(), leaves)):
        assert_close(name, a, b, 1e-5)
    with pytest.raises(ValueError, match="no gradient for q"):
        add_sinks_fused(o, den, c, q.requires_grad_(), (k_s, v_s, pos), gamma, **kw)

