"""Timing of the fused Triton hybrid attention kernels on a GPU: the launch-option sweep (``--sweep``: forward
pass 3's num_warps / num_stages / chunk size / superchunk, and the decode kernel's BD / num_warps, each variant's
output compared with the shipped launch) and the bench grid (``--bench OUT.json``: ``run_kernel_bench``, the same
grid as ``linearize bench kernels`` with this script's overrides and a wall budget). Formerly the timing half of
``gpu_check_kernels.py``; its parity half is the test ``python -m pytest tests/gpu/test_gpu_kernels.py``.

    python benchmarks/gpu_kernel_sweep.py --sweep                      # launch-option sweep
    python benchmarks/gpu_kernel_sweep.py --bench out.json             # the full bench grid (time-capped)
    python benchmarks/gpu_kernel_sweep.py --bench out.json --quick     # run_kernel_bench(quick=True)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time launch variants of the forward and decode kernels")
    ap.add_argument("--bench", metavar="OUT.json", help="run the bench grid (run_kernel_bench) and write its JSON")
    ap.add_argument("--quick", action="store_true", help="the bench grid's quick form")
    ap.add_argument("--max-seconds", type=float, default=200.0, help="wall budget of the whole script (default 200)")
    ap.add_argument("--seq-lens", type=_ints, help="bench grid's sequence lengths, e.g. 1024,4096")
    ap.add_argument("--batch-heads", type=_ints, help="bench grid's B*H values, e.g. 32,256")
    ap.add_argument("--head-dims", type=_ints, help="bench grid's head dims, e.g. 128,64")
    ap.add_argument("--decode-batch-heads", type=_ints, help="bench grid's decode B*H values, e.g. 32,256,2048")
    ap.add_argument("--no-decode", action="store_true", help="leave the decode kernel out of the bench grid")
    a = ap.parse_args(argv)
    if not (a.sweep or a.bench):
        ap.error("nothing to do: pass --sweep and/or --bench OUT.json")
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if a.sweep:
        sweep()
    if a.bench:
        from linearize.bench.kernels import run_kernel_bench

        kw = dict(quick=a.quick, max_seconds=max(10.0, a.max_seconds - (time.time() - t0)), json_path=a.bench,
                  seq_lens=a.seq_lens, batch_heads=a.batch_heads, head_dims=a.head_dims,
                  decode_batch_heads=() if a.no_decode else a.decode_batch_heads)
        run_kernel_bench(**kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
