"""bf16 and fp32 parity of the fused Triton hybrid attention kernels on a CUDA GPU, compiled (no interpreter):
outputs, final state and every gradient of the chunk kernels, and three decode steps, against the fp32 PyTorch
reference at realistic sizes (one T=16k case with many superchunks). Gradients matter: some Triton versions
miscompile backward kernels on Hopper. Relative Frobenius error below 1e-2 in bf16 and 1e-3 in fp32.

    python -m pytest tests/gpu -q        (on a GPU machine; skipped without CUDA)

Formerly the parity half of ``benchmarks/gpu_check_kernels.py``; its timing half (launch sweep, bench grid) is
``benchmarks/gpu_kernel_sweep.py``."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: bf16 parity of the compiled Triton hybrid attention kernels "
                "(run `python -m pytest tests/gpu` on a GPU machine)", allow_module_level=True)

from linearize.kernels import hybrid_decode_step  # noqa: E402
from linearize.kernels.hybrid.chunk import hybrid_attention_triton  # noqa: E402
from linearize.kernels.hybrid.naive import hybrid_attention_chunked  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-3}
KNOWN_BF16 = {"hybrid GQA Hs=Hk": "bf16 dgamma 1.11e-2 (H100, 2026-11-28 and 2026-12-07): the row sums behind dgamma "
                                  "cancel almost exactly (docs/kernels.md, dgamma (bf16)); every other error < 4e-3"}

CASES = [
    # name, B, H, Hk, Hs, T, P, d, D, F, W
    ("hybrid GQA Hs=Hk", 2, 8, 2, 2, 2000, 0, 64, 64, 64, 64),
    ("hybrid D128 F128", 1, 4, 4, 4, 4096, 0, 128, 128, 128, 128),
    ("hybrid Hs=H W256", 2, 4, 1, 4, 1500, 0, 64, 64, 32, 256),
    ("linear W=0 F256", 2, 4, 2, 2, 3000, 0, 64, 128, 256, 0),
    ("prefix P=300", 2, 4, 2, 2, 1000, 300, 64, 64, 64, 64),
    ("hybrid T=16k GQA", 1, 4, 1, 1, 16384, 0, 128, 128, 128, 64),  # many superchunks
]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def chunk_errors(B, H, Hk, Hs, T, P, d, D, F, W, dtype) -> dict[str, float]:
    """Relative error of the Triton chunk kernel's o, S, z and every gradient against the fp32 reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    Tk = T + P
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    base = dict(q=r(B, H, T, d), k=r(B, Hk, Tk, d), v=r(B, Hk, Tk, D),
                fq=torch.softmax(r(B, H, T, F), -1), fk=torch.softmax(r(B, Hs, Tk, F), -1),
                gamma=torch.sigmoid(r(H) - 2))
    S0, z0 = torch.rand(B, Hs, F, D, device="cuda", generator=g) * 0.1, torch.rand(B, Hs, F, device="cuda", generator=g)
    if W == 0:
        base.update(q=None, k=None, gamma=None)
    do = r(B, H, T, D)

    def run(fn, cast):
        x = {n: (None if t is None else (t.to(cast) if n != "gamma" else t.clone()).requires_grad_())
             for n, t in base.items()}
        st = (S0.clone().requires_grad_(), z0.clone().requires_grad_())
        o, (S, z) = fn(*x.values(), window=W, scale=d**-0.5, initial_state=st, output_final_state=True)
        loss = (o.float() * do).sum() + S.sum() * 1e-3 + z.sum() * 1e-3
        leaves = [(n, t) for n, t in x.items() if t is not None] + [("S0", st[0]), ("z0", st[1])]
        grads = torch.autograd.grad(loss, [t for _, t in leaves], allow_unused=True)
        out = {"o": o, "S": S, "z": z}
        out.update({f"d{n}": gr for (n, _), gr in zip(leaves, grads)})
        return out

    # The fp32 reference sees the same (dtype-rounded) inputs: the window max c_t routes its gradient to one argmax
    # key, and rounding the inputs flips near-tied argmaxes (a discontinuity of the definition, not kernel error).
    base = {n: t if t is None or n == "gamma" else t.to(dtype).float() for n, t in base.items()}
    ref = run(hybrid_attention_chunked, torch.float32)
    got = run(hybrid_attention_triton, dtype)
    return {k: rel(got[k], ref[k]) if got[k] is not None and ref[k] is not None and ref[k].norm() > 0 else 0.0
            for k in ref}


def decode_errors(dtype, B=8, H=8, Hk=2, Hs=2, n=500, steps=3, d=64, D=64, F=64, W=64) -> dict[str, float]:
    """Three Triton decode steps from the reference's state after n tokens against the reference's full pass."""
    g = torch.Generator(device="cuda").manual_seed(1)
    L = n + steps
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(B, H, L, d), r(B, Hk, L, d), r(B, Hk, L, D)
    fq, fk, gamma = torch.softmax(r(B, H, L, F), -1), torch.softmax(r(B, Hs, L, F), -1), torch.sigmoid(r(H) - 2)
    full, (Sf, zf) = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, scale=d**-0.5, output_final_state=True)
    _, (S, z) = hybrid_attention_chunked(q[:, :, :n], k[:, :, :n], v[:, :, :n], fq[:, :, :n], fk[:, :, :n], gamma,
                                         window=W, scale=d**-0.5, output_final_state=True)
    kc = torch.zeros(B, Hk, W, d, device="cuda", dtype=dtype)
    vc = torch.zeros(B, Hk, W, D, device="cuda", dtype=dtype)
    fc = torch.zeros(B, Hs, W, F, device="cuda", dtype=dtype)
    for j in range(n - W + 1, n):
        kc[:, :, j % W], vc[:, :, j % W], fc[:, :, j % W] = k[:, :, j], v[:, :, j], fk[:, :, j]
    pos = torch.full((B,), n, device="cuda", dtype=torch.int64)
    S, z = S.contiguous(), z.contiguous()
    outs = []
    for s in range(steps):
        t = n + s
        cast = lambda x: x[:, :, t : t + 1].to(dtype)  # noqa: E731
        outs.append(hybrid_decode_step(cast(q), cast(k), cast(v), cast(fq), cast(fk), gamma, state=(S, z), k_cache=kc,
                                       v_cache=vc, fk_cache=fc, pos=pos, window=W, scale=d**-0.5, backend="triton"))
        pos += 1
    return {"o": rel(torch.cat(outs, 2), full[:, :, n:]), "S": rel(S, Sf), "z": rel(z, zf)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunk_kernel_matches_fp32_reference(case, dtype, request):
    if dtype == torch.bfloat16 and case[0] in KNOWN_BF16:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_BF16[case[0]], strict=True))
    errs = chunk_errors(*case[1:], dtype)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"{case[0]} {dtype}: relative error >= {TOL[dtype]:g} in {bad}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_steps_match_fp32_reference(dtype):
    errs = decode_errors(dtype)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"decode 3 steps {dtype}: relative error >= {TOL[dtype]:g} in {bad}"


def test_graph_replay_us_runs_the_captured_work_each_replay():
    """``bench.kernels.graph_replay_us`` (the decode benchmarks' timer): one eager call on a side stream, then
    ``warmup + reps`` replays of the captured work, each doing it once; a positive finite time."""
    import math

    from linearize.bench.kernels import graph_replay_us

    counter = torch.zeros((), device="cuda")
    us = graph_replay_us(lambda: counter.add_(1), reps=7, warmup=2)
    torch.cuda.synchronize()
    assert counter.item() == 1 + 2 + 7
    assert math.isfinite(us) and us > 0
