"""The fused global-cache decode step (``linearize/kernels/hybrid/global_decode.py``) compiled on a CUDA GPU against
its PyTorch reference ``global_cache.global_decode_step``: several consecutive steps (keys leave the window, fill the
empty slots and replace members), in fp32 (within 1e-5) and with bf16 inputs, caches and global set (fp32 state,
within 1e-2); and one step captured in a CUDA graph, replayed over a sequence, equal to eager steps. fp32 parity
under the interpreter is ``tests/kernels/test_global_decode.py``.

    python -m pytest tests/gpu -q        (on a GPU machine; skipped without CUDA)"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: parity and CUDA-graph capture of the compiled global-cache decode kernel "
                "(run `python -m pytest tests/gpu` on a GPU machine)", allow_module_level=True)

from linearize.kernels.hybrid.global_cache import empty_global_set, global_decode_step
from linearize.kernels.hybrid.naive import NO_SINK

# name: (B, H, Hk, Hs, d = D, F, W, K, sinks)
CASES = {
    "smollm2-heads": (4, 9, 3, 3, 64, 64, 16, 8, True),
    "gqa-Hs=H": (3, 8, 2, 8, 64, 32, 8, 4, False),
    "llama-heads": (2, 32, 8, 8, 128, 128, 16, 8, True),
}
STEPS = 24


def _state(B, H, Hk, Hs, d, F, W, K, sinks, dtype, seed=0):
    """Buffers mid-sequence (positions differ per sequence, empty slots in the global set, members in sequence 1)
    and the inputs of ``STEPS`` steps, on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    buf = {"k_cache": r(B, Hk, W, d).to(dtype), "v_cache": r(B, Hk, W, d).to(dtype),
           "fk_cache": r(B, Hs, W, F).exp().to(dtype),
           "state": (r(B, Hs, F, d).abs(), r(B, Hs, F).abs() * F + 1),
           "pos": torch.tensor([W + 3 * b for b in range(B)], device="cuda")}
    gset = list(empty_global_set(B, Hk, Hs, K, d, d, F, dtype=dtype, device="cuda"))
    m = min(K, 2)
    gset[0][1, :, :m], gset[1][1, :, :m], gset[2][1, :, :m] = r(Hk, m, d), r(Hk, m, d), r(Hs, m, F).exp()
    gset[3][1, :, :m] = torch.arange(m, device="cuda") + 2  # keys 2, 3 (not sinks)
    gset[4][1, :, :m] = r(Hk, m).abs() * 4 * d
    buf["global_set"] = tuple(gset)
    sk = None
    if sinks:
        spos = torch.tensor([[0, NO_SINK]] + [[1, W + 5]] * (B - 1), device="cuda")
        sk = (r(B, Hk, 2, d).to(dtype), r(B, Hk, 2, d).to(dtype), spos)
    steps = [(r(B, H, 1, d).to(dtype), r(B, Hk, 1, d).to(dtype), r(B, Hk, 1, d).to(dtype),
              (r(B, H, 1, F) * 0.3).exp().to(dtype), (r(B, Hs, 1, F) * 0.3).exp().to(dtype)) for _ in range(STEPS)]
    gamma = torch.rand(H, generator=g, device="cuda") * 0.8 + 0.1
    return buf, sk, steps, gamma


def _clone(buf):
    return {k: tuple(x.clone() for x in v) if isinstance(v, tuple) else v.clone() for k, v in buf.items()}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_step_matches_torch_step_on_cuda(case, dtype):
    B, H, Hk, Hs, d, F, W, K, sinks = CASES[case]
    buf, sk, steps, gamma = _state(B, H, Hk, Hs, d, F, W, K, sinks, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref, tri = _clone(buf), _clone(buf)
    replaced = 0
    for t, x in enumerate(steps):
        before = ref["global_set"][3].clone(), torch.isfinite(ref["global_set"][4])
        o_ref = global_decode_step(*x, gamma, window=W, scale=d**-0.5, sinks=sk, **ref)
        o_tri = global_decode_step(*x, gamma, window=W, scale=d**-0.5, sinks=sk, backend="triton", **tri)
        replaced += int((before[1] & (before[0] != ref["global_set"][3])).sum())
        assert rel(o_tri, o_ref) < tol, f"step {t}: o differs by {rel(o_tri, o_ref):.2e}"
        for name in ("k_cache", "v_cache", "fk_cache"):
            assert torch.equal(tri[name], ref[name]), f"step {t}: {name}"
        # positions exactly (a near-tie of recall errors could flip with the summation order: none at these seeds)
        assert torch.equal(tri["global_set"][3], ref["global_set"][3]), f"step {t}: member positions"
        for name, a, b in zip(("k", "v", "fk"), ref["global_set"][:3], tri["global_set"][:3]):
            assert torch.equal(a, b), f"step {t}: global set {name}"
        fin = torch.isfinite(ref["global_set"][4])
        assert torch.equal(fin, torch.isfinite(tri["global_set"][4]))
        torch.testing.assert_close(tri["global_set"][4][fin], ref["global_set"][4][fin], atol=0, rtol=1e-5)
        for name, a, b in zip("Sz", ref["state"], tri["state"]):
            assert rel(b, a) < 1e-5, f"step {t}: {name} differs by {rel(b, a):.2e}"
        ref["pos"] += 1
        tri["pos"] += 1
    assert replaced > 0, "no member was replaced: the test does not exercise eviction"


def test_triton_step_replays_from_a_cuda_graph():
    """Capture one step (and the position's advance), replay it with each step's inputs copied into static buffers:
    outputs, caches, global set and state equal eager Triton steps bit for bit."""
    B, H, Hk, Hs, d, F, W, K, sinks = CASES["smollm2-heads"]
    buf, sk, steps, gamma = _state(B, H, Hk, Hs, d, F, W, K, sinks, torch.bfloat16)
    kw = {"window": W, "scale": d**-0.5, "sinks": sk, "backend": "triton"}

    eager = _clone(buf)
    want = []
    for x in steps:
        want.append(global_decode_step(*x, gamma, **kw, **eager).clone())
        eager["pos"] += 1

    graphed = _clone(buf)
    static = [x.clone() for x in steps[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the graph, on copies
        global_decode_step(*static, gamma, **kw, **_clone(buf))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = global_decode_step(*static, gamma, **kw, **graphed)
        graphed["pos"] += 1
    for name, x in buf.items():  # capture does not run the step: back to the starting buffers
        for dst, src in zip(*((graphed[name], x) if isinstance(x, tuple) else ((graphed[name],), (x,)))):
            dst.copy_(src)
    got = []
    for x in steps:
        for dst, src in zip(static, x):
            dst.copy_(src)
        graph.replay()
        got.append(out.clone())
    torch.cuda.synchronize()
    for t, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {t}: replayed output differs from eager"
    for name in ("k_cache", "v_cache", "fk_cache", "pos"):
        assert torch.equal(graphed[name], eager[name]), name
    for name, a, b in zip(("k", "v", "fk", "pos", "score", "S", "z"), graphed["global_set"] + graphed["state"],
                          eager["global_set"] + eager["state"]):
        assert torch.equal(a, b), name
