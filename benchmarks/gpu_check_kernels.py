"""GPU parity check of the fused Triton hybrid attention kernels: outputs, final state, every gradient (and the
decode step) in bf16 and fp32 against the fp32 PyTorch reference at realistic sizes. Gradients matter: some Triton
versions miscompile backward kernels on Hopper.

    python benchmarks/gpu_check_kernels.py                          # parity table
    python benchmarks/gpu_check_kernels.py --bench out.json         # parity, then the full bench grid (time-capped)
    python benchmarks/gpu_check_kernels.py --bench out.json --quick # parity, then run_kernel_bench(quick=True)
    options: --no-parity, --max-seconds S (wall budget of the whole script, default 200), --seq-lens 1024,4096,
             --batch-heads 32,256, --head-dims 128,64, --decode-batch-heads 32,256,2048, --no-decode

Prints a PASS/FAIL table (relative Frobenius error; bf16 < 1e-2, fp32 < 1e-3) and exits 1 on any failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_only  # noqa: E402,F401  (linearize.kernels even without the package's dependencies)

from linearize.kernels import hybrid_decode_step  # noqa: E402
from linearize.kernels.hybrid.chunk import hybrid_attention_triton  # noqa: E402
from linearize.kernels.hybrid.naive import hybrid_attention_chunked  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-3}

CASES = [
    # name, B, H, Hk, Hs, T, P, d, D, F, W
    ("hybrid GQA Hs=Hk", 2, 8, 2, 2, 2000, 0, 64, 64, 64, 64),
    ("hybrid D128 F128", 1, 4, 4, 4, 4096, 0, 128, 128, 128, 128),
    ("hybrid Hs=H W256", 2, 4, 1, 4, 1500, 0, 64, 64, 32, 256),
    ("linear W=0 F256", 2, 4, 2, 2, 3000, 0, 64, 128, 256, 0),
    ("prefix P=300", 2, 4, 2, 2, 1000, 300, 64, 64, 64, 64),
    ("hybrid T=16k GQA", 1, 4, 1, 1, 16384, 0, 128, 128, 128, 64),  # many superchunks
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_chunk(name, B, H, Hk, Hs, T, P, d, D, F, W, dtype):
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
        x = {n: (None if t is None else (t.to(cast) if n != "gamma" else t.clone()).requires_grad_()) for n, t in base.items()}
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
    errs = {k: rel(got[k], ref[k]) if got[k] is not None and ref[k] is not None and ref[k].norm() > 0 else 0.0 for k in ref}
    return errs


def check_decode(dtype, B=8, H=8, Hk=2, Hs=2, n=500, steps=3, d=64, D=64, F=64, W=64):
    g = torch.Generator(device="cuda").manual_seed(1)
    L = n + steps
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(B, H, L, d), r(B, Hk, L, d), r(B, Hk, L, D)
    fq, fk, gamma = torch.softmax(r(B, H, L, F), -1), torch.softmax(r(B, Hs, L, F), -1), torch.sigmoid(r(H) - 2)
    full, (Sf, zf) = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, scale=d**-0.5, output_final_state=True)
    _, (S, z) = hybrid_attention_chunked(q[:, :, :n], k[:, :, :n], v[:, :, :n], fq[:, :, :n], fk[:, :, :n], gamma,
                                         window=W, scale=d**-0.5, output_final_state=True)
    kc, vc, fc = (torch.zeros(B, Hk, W, d, device="cuda", dtype=dtype), torch.zeros(B, Hk, W, D, device="cuda", dtype=dtype),
                  torch.zeros(B, Hs, W, F, device="cuda", dtype=dtype))
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


def _opt(name, default=None, cast=str):
    if name not in sys.argv:
        return default
    i = sys.argv.index(name)
    if i + 1 >= len(sys.argv) or sys.argv[i + 1].startswith("--"):
        return default
    return cast(sys.argv[i + 1])


def _ints(s):
    return tuple(int(x) for x in s.split(","))


def sweep() -> None:
    """Launch-option sweep of the forward pass 3 (num_warps, num_stages, chunk size, superchunk) and of the decode
    kernel (BD, num_warps) at the reference sizes; prints ms / us and GB/s per variant."""
    from linearize.bench.kernels import _bench, _bytes_fwd, _graph_us, reference_inputs
    from linearize.kernels.hybrid import chunk as C
    from linearize.kernels.hybrid import decode as Dm

    B, H, Hk, T, D = 2, 16, 4, 16384, 128
    q, k, v, fq, fk, gamma = reference_inputs(B, H, Hk, T, D)
    for W in (64, 0):
        args = (q, k, v, fq, fk, gamma) if W else (None, None, v, fq, fk, None)
        nb = _bytes_fwd(B, H, Hk, Hk, T, D, D, D, W)
        with torch.no_grad():  # the shipped launch: every variant's output is compared with it
            base = C.hybrid_attention_triton(*args, window=W, scale=D**-0.5)[0]
        for cs, nsub, warps, stages, bd in [(None, None, 8, None, None), (None, None, 4, 2, None),
                                            (None, None, 4, 3, None), (None, 16, 4, 2, None),
                                            (None, None, 8, 1, 128), (None, None, 8, 2, 128),
                                            (None, None, 4, 1, 128), (32, None, 8, 2, 128), (None, None, 2, 2, 32)]:
            launch = C.ForwardLaunch(num_warps=warps, num_stages=stages or C.ForwardLaunch.num_stages, block_d=bd)
            tag = f"W={W} chunk={cs} nsub={nsub} warps={warps} stages={stages} BD={bd}"
            try:
                fn = lambda: C.hybrid_attention_triton(*args, window=W, scale=D**-0.5, chunk_size=cs,  # noqa: E731
                                                       sub_chunks=nsub, launch=launch)[0]
                with torch.no_grad():
                    err = rel(fn(), base)
                    ms = _bench(fn, rep=100)
                print(f"sweep fwd {tag}: {ms:.3f} ms {nb / ms / 1e6:.0f} GB/s (rel to shipped {err:.1e})", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"sweep fwd {tag}: ERROR {e}"[:200])
    # decode at B*H = 2048
    Bd, W, Hs = 128, 64, Hk
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.5).to(torch.bfloat16)  # noqa: E731
    qd, kd, vd = r(Bd, H, 1, D), r(Bd, Hk, 1, D), r(Bd, Hk, 1, D)
    fqd, fkd = torch.rand(Bd, H, 1, D, device="cuda").bfloat16(), torch.rand(Bd, Hs, 1, D, device="cuda").bfloat16()
    S, z = torch.rand(Bd, Hs, D, D, device="cuda"), torch.rand(Bd, Hs, D, device="cuda")
    kc, vc, fc = r(Bd, Hk, W, D), r(Bd, Hk, W, D), torch.rand(Bd, Hs, W, D, device="cuda").bfloat16()
    pos = torch.full((Bd,), 4096, device="cuda", dtype=torch.int32)
    out = torch.empty(Bd, H, 1, D, device="cuda", dtype=torch.bfloat16)
    nb = 2 * 4 * (D * D + D) * Bd * Hs + 2 * W * Bd * Hk * 2 * D
    for bd, warps in [(32, 4), (16, 4), (16, 2), (32, 2), (64, 4), (64, 8), (128, 8), (32, 8)]:
        launch = Dm.DecodeLaunch(block_d=bd, num_warps=warps)
        try:
            us = _graph_us(lambda: Dm.hybrid_decode_step(qd, kd, vd, fqd, fkd, gamma, state=(S, z), k_cache=kc,
                                                         v_cache=vc, fk_cache=fc, pos=pos, window=W, scale=D**-0.5,
                                                         out=out, launch=launch))
            print(f"sweep decode BH=2048 BD={bd} warps={warps}: {us:.1f} us {nb / us / 1e3:.0f} GB/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"sweep decode BD={bd} warps={warps}: ERROR {e}"[:200])


def main() -> int:
    import time

    import triton

    t0 = time.time()
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    ok = True
    if "--sweep" in sys.argv:
        sweep()
    if "--no-parity" not in sys.argv:
        ok = parity()
    print(f"parity done after {time.time() - t0:.0f} s", flush=True)
    if "--bench" in sys.argv:
        from linearize.bench.kernels import run_kernel_bench

        budget = _opt("--max-seconds", 200.0, float) - (time.time() - t0)
        kw = dict(quick="--quick" in sys.argv, max_seconds=max(10.0, budget), json_path=_opt("--bench"),
                  seq_lens=_opt("--seq-lens", None, _ints), batch_heads=_opt("--batch-heads", None, _ints),
                  head_dims=_opt("--head-dims", None, _ints),
                  decode_batch_heads=_opt("--decode-batch-heads", None, _ints))
        if "--no-decode" in sys.argv:
            kw["decode_batch_heads"] = ()
        run_kernel_bench(**kw)
    return 0 if ok else 1


def parity() -> bool:
    ok = True
    print(f"{'case':<22} {'dtype':<9} {'worst':<8} {'max rel err':>11}  result  (all errors)", flush=True)
    for case in CASES:
        for dtype in (torch.bfloat16, torch.float32):
            try:
                errs = check_chunk(*case, dtype)
            except Exception as e:  # noqa: BLE001 - report every case
                print(f"{case[0]:<22} {str(dtype)[6:]:<9} ERROR {type(e).__name__}: {e}"[:300], flush=True)
                ok = False
                continue
            worst = max(errs, key=errs.get)
            good = errs[worst] < TOL[dtype]
            ok &= good
            detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{case[0]:<22} {str(dtype)[6:]:<9} {worst:<8} {errs[worst]:>11.2e}  {'PASS' if good else 'FAIL'}    {detail}", flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        try:
            errs = check_decode(dtype)
            worst = max(errs, key=errs.get)
            good = errs[worst] < TOL[dtype]
            ok &= good
            detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{'decode 3 steps':<22} {str(dtype)[6:]:<9} {worst:<8} {errs[worst]:>11.2e}  {'PASS' if good else 'FAIL'}    {detail}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"decode {dtype} ERROR {type(e).__name__}: {e}"[:300], flush=True)
            ok = False
    print("ALL PASS" if ok else "SOME FAILED", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
