"""The three PyTorch references agree: quadratic == chunked == recurrent (outputs, final state, gradients), under
random prefixes, initial states, padding masks and GQA layouts. Fast: plain torch on CPU."""

from __future__ import annotations

import pytest
import torch

from linearize.kernels import hybrid_attention_chunked, hybrid_attention_quadratic, hybrid_attention_recurrent
from tests.kernels.conftest import assert_close

CASES = [
    # (B, H, Hk, Hs, T, P, d, D, F, W, state, mask)
    (2, 2, 2, 2, 37, 0, 8, 12, 6, 8, False, False),
    (1, 4, 2, 2, 50, 0, 8, 8, 5, 16, True, False),
    (2, 4, 1, 4, 23, 11, 8, 8, 4, 16, True, True),
    (1, 2, 1, 1, 20, 5, 8, 8, 4, 64, True, True),  # W >= Tk
    (2, 2, 2, 2, 41, 7, 8, 8, 4, 0, True, True),  # pure linear
    (1, 3, 3, 3, 1, 15, 8, 8, 4, 16, True, False),  # one query after a cached window (decode shape)
]


def _ids(c):
    B, H, Hk, Hs, T, P, d, D, F, W, st, m = c
    return f"B{B}-H{H}-Hk{Hk}-Hs{Hs}-T{T}-P{P}-D{D}-F{F}-W{W}" + ("-state" if st else "") + ("-mask" if m else "")


def _inputs(B, H, Hk, Hs, T, P, d, D, F, W, state, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = T + P
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().requires_grad_()  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64).float().requires_grad_()  # noqa: E731
    x = dict(q=r(B, H, T, d), k=r(B, Hk, Tk, d), v=r(B, Hk, Tk, D), fq=u(B, H, T, F), fk=u(B, Hs, Tk, F),
             gamma=u(H))
    kw = dict(window=W, scale=d**-0.5, output_final_state=True)
    if state:
        kw["initial_state"] = (u(B, Hs, F, D), u(B, Hs, F))
    if mask:
        km = torch.rand(B, Tk, generator=g) > 0.3
        km[:, -1] = True  # keep the last key so no query has an empty window + empty state
        kw["key_mask"] = km
    return x, kw


def _run(fn, x, kw):
    o, (S, z) = fn(x["q"], x["k"], x["v"], x["fq"], x["fk"], x["gamma"], **kw)
    loss = (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() + S.sum() * 0.1 + z.sum() * 0.1
    leaves = list(x.values()) + list(kw.get("initial_state", ()))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = list(x) + (["S0", "z0"] if "initial_state" in kw else [])
    return {"o": o, "S": S, "z": z, **{f"d{n}": gr for n, gr in zip(names, grads)}}


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_references_agree(case):
    x, kw = _inputs(*case)
    quad = _run(hybrid_attention_quadratic, x, kw)
    for name, fn in [("chunked", lambda *a, **k: hybrid_attention_chunked(*a, chunk_size=16, **k)),
                     ("recurrent", hybrid_attention_recurrent)]:
        got = _run(fn, x, kw)
        for key in quad:
            assert_close(f"{name}:{key}", quad[key], got[key], 1e-5)


def test_prefill_then_steps_equals_full():
    """Chunked prefill of n tokens + chunked T=1 steps over the cached window == one pass over all tokens."""
    B, H, Hk, Hs, L, n, d, D, F, W = 2, 4, 2, 4, 30, 19, 8, 8, 4, 8
    x, kw = _inputs(B, H, Hk, Hs, L, 0, d, D, F, W, False, False)
    x = {k_: t.detach() for k_, t in x.items()}
    full, _ = hybrid_attention_chunked(**x, window=W, scale=d**-0.5)
    pre = dict(q=x["q"][:, :, :n], k=x["k"][:, :, :n], v=x["v"][:, :, :n], fq=x["fq"][:, :, :n], fk=x["fk"][:, :, :n])
    o, state = hybrid_attention_chunked(**pre, gamma=x["gamma"], window=W, scale=d**-0.5, output_final_state=True)
    outs = [o]
    for i in range(n, L):
        ks = max(0, i - W + 1)
        o, state = hybrid_attention_chunked(
            x["q"][:, :, i : i + 1], x["k"][:, :, ks : i + 1], x["v"][:, :, ks : i + 1], x["fq"][:, :, i : i + 1],
            x["fk"][:, :, ks : i + 1], x["gamma"], window=W, scale=d**-0.5, initial_state=state,
            output_final_state=True,
        )
        outs.append(o)
    assert_close("o", full, torch.cat(outs, 2), 1e-5)
