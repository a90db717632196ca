"""The delta-rule references (``linearize/kernels/delta/naive.py``): the chunked form equals the key-by-key one
(outputs, final state, every gradient) over windows, prefixes, GQA layouts and chunk sizes; a sequence split into two
calls with the carried state equals one call; padding keys (beta = 0, log_a = 0) equal dropped keys; with no write and
no decay the state stays S0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from linearize.kernels.delta import delta_attention, delta_chunked, delta_recurrent
from tests.kernels.conftest import assert_close

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def make_inputs(B=2, H=4, Hk=2, Hs=2, T=13, P=5, F=8, D=6, s0=True, seed=0):
    """fq, fk (non-negative features, unit norm), v, beta in [0, 1], log_a <= 0, S0 or None; fp32, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    Tk = T + P
    fq = Fn.normalize(torch.rand(B, H, T, F, generator=g), dim=-1)
    fk = Fn.normalize(torch.rand(B, Hs, Tk, F, generator=g), dim=-1)
    v = torch.randn(B, Hk, Tk, D, generator=g)
    beta = torch.rand(B, Hs, Tk, generator=g)
    log_a = -0.5 * torch.rand(B, Hs, Tk, generator=g)
    S0 = 0.3 * torch.randn(B, Hs, F, D + 1, generator=g) if s0 else None
    return [x.requires_grad_() if x is not None else None for x in (fq, fk, v, beta, log_a, S0)]


def run(fn, inputs, window, **kw):
    fq, fk, v, beta, log_a, S0 = inputs
    return fn(fq, fk, v, beta, log_a, window=window, initial_state=S0, output_final_state=True, **kw)


def grads(outs, inputs, weights):
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    leaves = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, leaves, allow_unused=True)


NAMES = ("fq", "fk", "v", "beta", "log_a", "S0")
CASES = [  # (window, P, Hs, S0, chunk)
    (0, 0, 2, False, 4), (0, 5, 4, True, 5), (1, 5, 2, True, 64), (1, 0, 4, False, 5),
    (5, 5, 2, False, 4), (5, 3, 4, True, 64), (5, 0, 2, True, 3), (40, 5, 4, True, 4), (40, 0, 2, False, 5),
]


@pytest.mark.parametrize("window,P,Hs,s0,chunk", CASES,
                         ids=[f"W{w}-P{p}-Hs{h}-{'S0' if s else 'zero'}-C{c}" for w, p, h, s, c in CASES])
def test_chunked_matches_recurrent_outputs_state_and_grads(window, P, Hs, s0, chunk):
    inputs = make_inputs(Hs=Hs, P=P, s0=s0)
    ref = run(delta_recurrent, inputs, window)
    got = run(delta_chunked, inputs, window, chunk=chunk)
    for name, r, o in zip(("L_n", "L_d", "final_state"), ref, got):
        assert_close(name, r, o, FWD_TOL)
    assert ref[0].shape == (2, 4, 13, 6) and ref[1].shape == (2, 4, 13) and ref[2].shape == (2, Hs, 8, 7)
    weights = [torch.randn_like(r) for r in ref]
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    for name, r, o in zip(names, grads(ref, inputs, weights), grads(got, inputs, weights)):
        assert_close(f"d{name}", r, o, GRAD_TOL)


def test_the_recurrence_is_the_delta_rule():
    """One key, no window: S1 = a (S0 - b k k^T S0) + b k [v, 1]^T, read by fq; checked by hand."""
    fq, fk, v, beta, log_a, S0 = (x.detach() for x in make_inputs(B=1, H=1, Hk=1, Hs=1, T=1, P=0))
    k, vt = fk[0, 0, 0], torch.cat([v[0, 0, 0], torch.ones(1)])
    a, b = log_a[0, 0, 0].exp(), beta[0, 0, 0]
    S1 = a * (S0[0, 0] - b * torch.outer(k, k @ S0[0, 0])) + b * torch.outer(k, vt)
    r = S1.T @ fq[0, 0, 0]
    for fn in (delta_recurrent, delta_chunked):
        L_n, L_d, final = fn(fq, fk, v, beta, log_a, window=0, initial_state=S0, output_final_state=True)
        assert_close("final", S1, final[0, 0], 1e-6)
        assert_close("L_n", r[:-1], L_n[0, 0, 0], 1e-6)
        assert torch.allclose(L_d[0, 0, 0], r[-1].clamp_min(0))


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("fn", [delta_recurrent, delta_chunked], ids=["recurrent", "chunked"])
def test_two_calls_with_carried_state_equal_one_call(fn, window):
    """The second call gets the window's last W - 1 keys as its prefix and the first call's final state."""
    fq, fk, v, beta, log_a, S0 = (x.detach() for x in make_inputs(T=17, P=0, Hs=4))
    whole = fn(fq, fk, v, beta, log_a, window=window, initial_state=S0, output_final_state=True)
    T1 = 9
    a = fn(fq[:, :, :T1], fk[:, :, :T1], v[:, :, :T1], beta[:, :, :T1], log_a[:, :, :T1], window=window,
           initial_state=S0, output_final_state=True)
    ks = T1 - max(window - 1, 0)  # keys not yet in the carried state
    b = fn(fq[:, :, T1:], fk[:, :, ks:], v[:, :, ks:], beta[:, :, ks:], log_a[:, :, ks:], window=window,
           initial_state=a[2], output_final_state=True)
    assert_close("L_n", whole[0], torch.cat([a[0], b[0]], dim=2), FWD_TOL)
    assert_close("L_d", whole[1], torch.cat([a[1], b[1]], dim=2), FWD_TOL)
    assert_close("final_state", whole[2], b[2], FWD_TOL)


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("fn", [delta_recurrent, delta_chunked], ids=["recurrent", "chunked"])
def test_left_padding_keys_equal_dropped_keys(fn, window):
    """Row 1 of the batch starts with 4 padding tokens (beta = 0, log_a = 0, arbitrary keys and values): its real
    queries and its final state equal a call over its real tokens alone."""
    fq, fk, v, beta, log_a, S0 = (x.detach().clone() for x in make_inputs(T=14, P=0))
    pad = 4
    beta[1, :, :pad] = 0.0
    log_a[1, :, :pad] = 0.0
    fk[1, :, :pad] = 5.0 * torch.randn_like(fk[1, :, :pad])  # not unit keys: they must not matter at all
    L_n, L_d, final = fn(fq, fk, v, beta, log_a, window=window, initial_state=S0, output_final_state=True)
    r = slice(1, 2)
    L_n1, L_d1, final1 = fn(fq[r, :, pad:], fk[r, :, pad:], v[r, :, pad:], beta[r, :, pad:], log_a[r, :, pad:],
                            window=window, initial_state=S0[r], output_final_state=True)
    assert_close("L_n", L_n1, L_n[r, :, pad:], FWD_TOL)
    assert_close("L_d", L_d1, L_d[r, :, pad:], FWD_TOL)
    assert_close("final_state", final1, final[r], FWD_TOL)


@pytest.mark.parametrize("fn", [delta_recurrent, delta_chunked], ids=["recurrent", "chunked"])
def test_no_write_and_no_decay_keep_the_state(fn):
    fq, fk, v, beta, _, S0 = (x.detach() for x in make_inputs(Hs=4))
    zero = torch.zeros_like(beta)
    L_n, L_d, final = fn(fq, fk, v, zero, zero, window=1, initial_state=S0, output_final_state=True)
    assert torch.equal(final, S0)
    r = torch.einsum("bhtf,bhfe->bhte", fq, S0)  # H == Hs here
    assert_close("L_n", r[..., :-1], L_n, 1e-6)
    assert_close("L_d", r[..., -1].clamp_min(0), L_d, 1e-6)


def test_torch_backend_is_the_chunked_form_and_bad_input_is_named():
    inputs = [x.detach() if x is not None else None for x in make_inputs()]
    fq, fk, v, beta, log_a, S0 = inputs
    got = delta_attention(fq, fk, v, beta, log_a, window=2, initial_state=S0, output_final_state=True, chunk=4)
    ref = run(delta_chunked, inputs, 2, chunk=4)
    for name, r, o in zip(("L_n", "L_d", "final_state"), ref, got):
        assert torch.equal(r, o), name  # on CPU "auto" is the torch path
    with pytest.raises(ValueError, match="backend must be one of"):
        delta_attention(fq, fk, v, beta, log_a, window=2, backend="triton")
    with pytest.raises(ValueError, match=r"beta must have shape \[B, Hs, Tk\]"):
        delta_chunked(fq, fk, v, beta[:, :, 1:], log_a, window=2)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        delta_recurrent(fq, fk, v, beta, log_a, window=2, initial_state=S0[..., :-1])


@pytest.mark.parametrize("window,P", [(0, 0), (3, 0), (3, 2), (6, 4)])
@pytest.mark.parametrize("fn", [delta_recurrent, delta_chunked], ids=["recurrent", "chunked"])
def test_query_reads_exactly_the_keys_that_left_its_window(fn, window, P):
    """d L_n[i] / d v[j] is non-zero exactly for keys j <= P + i - W (and the final state sees keys j <= Tk - W)."""
    fq, fk, v, beta, log_a, S0 = make_inputs(B=1, H=2, Hk=1, Hs=1, T=9, P=P)
    Tk = 9 + P
    L_n, _, final = fn(fq, fk, v, beta, log_a, window=window, initial_state=S0, output_final_state=True, **(
        {"chunk": 4} if fn is delta_chunked else {}))
    for i in range(9):
        (dv,) = torch.autograd.grad(L_n[0, :, i].sum(), v, retain_graph=True)
        seen = dv[0, 0].abs().sum(-1) > 0
        assert seen.tolist() == [j <= P + i - window for j in range(Tk)], f"query {i}"
    (dv,) = torch.autograd.grad(final[..., :-1].sum(), v)
    assert (dv[0, 0].abs().sum(-1) > 0).tolist() == [j <= Tk - window for j in range(Tk)], "final state"
