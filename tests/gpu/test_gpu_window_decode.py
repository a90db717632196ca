"""The decode step of a window-only layer (``kernels/hybrid/decode.py: window_decode_step``, the exact part alone)
compiled on a CUDA GPU against its PyTorch reference: consecutive steps over ring buffers mid-sequence, in fp32 (within
1e-5) and bf16 (within 1e-2), equal ring buffers; against the hybrid step with a zero state on the same inputs; and
one step captured in a CUDA graph, replayed over a sequence, equal to eager steps. fp32 parity under the
interpreter is ``tests/kernels/test_window_decode.py``.

    python -m pytest tests/gpu -q        (on a GPU machine; skipped without CUDA)"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: parity and CUDA-graph capture of the compiled window-only decode kernel "
                "(run `python -m pytest tests/gpu` on a GPU machine)", allow_module_level=True)

from linearize.kernels import hybrid_decode_step, window_decode_step, window_decode_step_torch
from linearize.kernels.hybrid.naive import NO_SINK

# name: (B, H, Hk, d = D, W, sinks)
CASES = {
    "smollm2-heads": (4, 9, 3, 64, 256, True),
    "llama-heads": (2, 32, 8, 128, 64, True),
    "large-D": (2, 4, 2, 256, 16, False),
}
STEPS = 12


def _state(B, H, Hk, d, W, sinks, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    buf = {"k_cache": r(B, Hk, W, d).to(dtype), "v_cache": r(B, Hk, W, d).to(dtype),
           "pos": torch.tensor([W - 2 + 3 * b for b in range(B)], device="cuda")}
    sk = None
    if sinks:
        spos = torch.tensor([[0, NO_SINK]] + [[0, 1]] * (B - 1), device="cuda")
        sk = (r(B, Hk, 2, d).to(dtype), r(B, Hk, 2, d).to(dtype), spos)
    steps = [(r(B, H, 1, d).to(dtype), r(B, Hk, 1, d).to(dtype), r(B, Hk, 1, d).to(dtype)) for _ in range(STEPS)]
    gamma = torch.rand(H, generator=g, device="cuda") * 0.8 + 0.1
    return buf, sk, steps, gamma


def _clone(buf):
    return {k: v.clone() for k, v in buf.items()}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_step_matches_torch_step_on_cuda(case, dtype):
    B, H, Hk, d, W, sinks = CASES[case]
    buf, sk, steps, gamma = _state(B, H, Hk, d, W, sinks, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref, tri = _clone(buf), _clone(buf)
    for t, x in enumerate(steps):
        o_ref = window_decode_step_torch(*x, gamma, window=W, scale=d**-0.5, sinks=sk, **ref)
        o_tri = window_decode_step(*x, gamma, window=W, scale=d**-0.5, sinks=sk, backend="triton", **tri)
        assert rel(o_tri, o_ref) < tol, f"step {t}: o differs by {rel(o_tri, o_ref):.2e}"
        for name in ("k_cache", "v_cache"):
            assert torch.equal(tri[name], ref[name]), f"step {t}: {name}"
        ref["pos"] += 1
        tri["pos"] += 1


def test_triton_step_equals_the_hybrid_step_with_a_zero_state():
    B, H, Hk, d, W, sinks = CASES["smollm2-heads"]
    buf, sk, steps, gamma = _state(B, H, Hk, d, W, sinks, torch.bfloat16)
    F = 64
    hyb = _clone(buf)
    state = (torch.zeros(B, Hk, F, d, device="cuda"), torch.zeros(B, Hk, F, device="cuda"))
    fk_cache = torch.zeros(B, Hk, W, F, device="cuda", dtype=torch.bfloat16)
    win = _clone(buf)
    for t, (q, k, v) in enumerate(steps):
        fq = torch.rand(B, H, 1, F, device="cuda", dtype=torch.bfloat16)
        fk = torch.zeros(B, Hk, 1, F, device="cuda", dtype=torch.bfloat16)
        o_h = hybrid_decode_step(q, k, v, fq, fk, gamma, state=state, fk_cache=fk_cache, window=W, scale=d**-0.5,
                                 sinks=sk, backend="triton", **hyb)
        o_w = window_decode_step(q, k, v, gamma, window=W, scale=d**-0.5, sinks=sk, backend="triton", **win)
        assert rel(o_w, o_h) < 1e-2, f"step {t}: {rel(o_w, o_h):.2e}"
        assert torch.equal(win["k_cache"], hyb["k_cache"]) and torch.equal(win["v_cache"], hyb["v_cache"])
        hyb["pos"] += 1
        win["pos"] += 1


def test_triton_step_replays_from_a_cuda_graph():
    B, H, Hk, d, W, sinks = CASES["smollm2-heads"]
    buf, sk, steps, gamma = _state(B, H, Hk, d, W, sinks, torch.bfloat16)
    kw = {"window": W, "scale": d**-0.5, "sinks": sk, "backend": "triton"}
    eager = _clone(buf)
    want = []
    for x in steps:
        want.append(window_decode_step(*x, gamma, **kw, **eager).clone())
        eager["pos"] += 1
    graphed = _clone(buf)
    static = [x.clone() for x in steps[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the graph, on copies
        window_decode_step(*static, gamma, **kw, **_clone(buf))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = window_decode_step(*static, gamma, **kw, **graphed)
        graphed["pos"] += 1
    for name, x in buf.items():  # capture does not run the step: back to the starting buffers
        graphed[name].copy_(x)
    got = []
    for x in steps:
        for dst, src in zip(static, x):
            dst.copy_(src)
        graph.replay()
        got.append(out.clone())
    torch.cuda.synchronize()
    for t, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {t}: replayed output differs from eager"
    for name in ("k_cache", "v_cache", "pos"):
        assert torch.equal(graphed[name], eager[name]), name
