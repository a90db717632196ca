"""GPU benchmark of the hybrid decode step: the fused kernel (``DecodeLaunch(split_f=None)``) against the split
two-kernel path (``DecodeLaunch(split_f=k, ...)``), see ``linearize/kernels/hybrid/decode.py``.

    python3 benchmarks/gpu_decode_kernel.py OUT.json [--max-seconds S]   # default budget 150 s

Grid: B * H in (256, 2048, 8192) (B = round(target / H)) x three geometries, W = 64, E = 4 sinks, bf16 q / k / v /
features / caches, fp32 state:
  * ``smollm2``: SmolLM2-135M (H = 9 query, Hk = Hs = 3 kv / state heads, d = D = 64) with hedgehog's F = 2 * 64;
  * ``d64-f64``: the same heads with F = 64;
  * ``d128-f128``: H = 32, Hk = Hs = 8, d = D = F = 128 (7-8B-class attention).

Check (eager, 3 steps from one state, positions per row drawn in [0, 3W) so that rows sit below, at and above the
window): every option's outputs (relative Frobenius error < 1e-2), state S and z (< 1e-4) against the fused path
and, to tell the two apart when they disagree, against the fp32 PyTorch step on the same bf16 inputs; the caches
must be equal. Timing: one step of each of L "layers" (separate state / cache / input buffers, L chosen so that
they span >= 256 MB, so consecutive steps do not find their state in L2 as no decode loop would) captured in one
CUDA graph; median of 15 replays after 3 warm-up replays, per step = replay / L.

Bytes per step that must move (the effective bandwidth's numerator; no scratch partials counted): fp32 state read
+ written ``2 * 4 * (F * D + F)`` per state head; the W - 1 cached window keys ``(W - 1) * (d + D) * 2`` per key
head; the leaving key's phi(k) slot ``2 F`` per state head; the sinks ``E * (d + D) * 2`` per key head and their
positions; the new token's q, k, v, fq, fk (bf16, at their head counts); the new k, v, fk slots written; o written.
Peak used for the percentage: 4.8 TB/s (H200 HBM3e).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import triton

from linearize.kernels.hybrid.decode import DecodeLaunch, hybrid_decode_step
from linearize.kernels.hybrid.decode_torch import hybrid_decode_step_torch

DEV = "cuda"
PEAK_GBPS = 4800.0
W, E = 64, 4
DT = torch.bfloat16
BATCH_HEADS = (256, 2048, 8192)
GEOMETRIES = [
    # name, H, Hk, Hs, d, D, F
    ("smollm2", 9, 3, 3, 64, 64, 128),
    ("d64-f64", 9, 3, 3, 64, 64, 64),
    ("d128-f128", 32, 8, 8, 128, 128, 128),
]
OPTIONS = [
    ("fused", DecodeLaunch(split_f=None)),
    ("auto", DecodeLaunch()),  # the default: fused below B * H = 2,048, split1 from there
    ("split1", DecodeLaunch(split_f=1)),
    ("split2", DecodeLaunch(split_f=2)),
    ("split4", DecodeLaunch(split_f=4)),
    ("split8", DecodeLaunch(split_f=8)),
    ("split4-w2", DecodeLaunch(split_f=4, num_warps=2)),
    ("split8-w2", DecodeLaunch(split_f=8, num_warps=2)),
    ("split2-w8", DecodeLaunch(split_f=2, num_warps=8)),
    ("split4-ww8", DecodeLaunch(split_f=4, window_num_warps=8)),
]
TOL_O, TOL_STATE = 1e-2, 1e-4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def step_bytes(B, H, Hk, Hs, d, D, F):
    state = 2 * 4 * (F * D + F) * B * Hs
    window = (W - 1) * (d + D) * 2 * B * Hk + 2 * F * B * Hs
    sinks = E * (d + D) * 2 * B * Hk + 4 * E * B
    inputs = 2 * B * (H * (d + F) + Hk * (d + D) + Hs * F)
    writes = 2 * B * (Hk * (d + D) + Hs * F) + 2 * B * H * D
    return state + window + sinks + inputs + writes


def make_layer(B, H, Hk, Hs, d, D, F, g, pos):
    """Inputs, state and caches of one layer (bf16 tokens / caches, fp32 state), as the GPU checks draw them."""
    dev = DEV
    r = lambda *s: (torch.randn(*s, device=dev, generator=g) * 0.5).to(DT)  # noqa: E731
    sm = lambda *s: torch.softmax(torch.randn(*s, device=dev, generator=g), -1).to(DT)  # noqa: E731
    return dict(
        q=r(B, H, 1, d), k=r(B, Hk, 1, d), v=r(B, Hk, 1, D), fq=sm(B, H, 1, F), fk=sm(B, Hs, 1, F),
        gamma=torch.full((H,), 0.1, device=dev),
        S=torch.rand(B, Hs, F, D, device=dev, generator=g) * 0.1, z=torch.rand(B, Hs, F, device=dev, generator=g),
        kc=r(B, Hk, W, d), vc=r(B, Hk, W, D), fc=sm(B, Hs, W, F),
        sinks=(r(B, Hk, E, d), r(B, Hk, E, D), torch.arange(E, device=dev, dtype=torch.int32).repeat(B, 1)),
        pos=pos, out=torch.empty(B, H, 1, D, device=dev, dtype=DT), scale=d**-0.5,
    )


def call(fn, L, launch=None, *, state=None, caches=None, out=True):
    kw = {} if launch is None else dict(launch=launch)
    S, z = state if state is not None else (L["S"], L["z"])
    kc, vc, fc = caches if caches is not None else (L["kc"], L["vc"], L["fc"])
    return fn(L["q"], L["k"], L["v"], L["fq"], L["fk"], L["gamma"], state=(S, z), k_cache=kc, v_cache=vc, fk_cache=fc,
              pos=L["pos"], window=W, scale=L["scale"], sinks=L["sinks"], out=L["out"] if out else None, **kw)


def check(L, steps=3):
    """Every option (and the torch step) from clones of one layer's state and caches; errors against the fused
    path and the torch step."""
    runs = {}
    for name, launch in [("torch", None)] + OPTIONS:
        S, z = L["S"].clone(), L["z"].clone()
        caches = tuple(L[n].clone() for n in ("kc", "vc", "fc"))
        pos0 = L["pos"].clone()
        outs = []
        for _ in range(steps):
            fn = hybrid_decode_step_torch if launch is None else hybrid_decode_step
            outs.append(call(fn, L, launch, state=(S, z), caches=caches, out=False).clone())
            L["pos"] += 1
        L["pos"].copy_(pos0)
        runs[name] = (torch.cat(outs, 2).float(), S, z, caches)
    torch.cuda.synchronize()
    res = {}
    for name, _ in OPTIONS:
        o, S, z, caches = runs[name]
        e = {}
        for ref_name in ("fused", "torch"):
            ro, rS, rz, rc = runs[ref_name]
            e[ref_name] = dict(o=rel(o, ro), S=rel(S, rS), z=rel(z, rz),
                               caches_equal=all(torch.equal(a, b) for a, b in zip(caches, rc)))
        ok = lambda x: x["o"] < TOL_O and x["S"] < TOL_STATE and x["z"] < TOL_STATE and x["caches_equal"]  # noqa: E731
        e["pass_vs_fused"] = ok(e["fused"])
        e["pass_vs_torch"] = ok(e["torch"])
        res[name] = e
    return res


def time_graph(layers, launch):
    """us per step: one step of every layer in one CUDA graph (``graph_replay_us``); median replay / len(layers)."""
    from linearize.bench.kernels import graph_replay_us

    return graph_replay_us(lambda: [call(hybrid_decode_step, L, launch) for L in layers]) / len(layers)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_path", metavar="OUT.json")
    ap.add_argument("--max-seconds", type=float, default=150.0, help="time budget (default 150)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a GPU host", file=sys.stderr)
        return 2
    out_path, budget = a.out_path, a.max_seconds
    t0 = time.time()
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  peak_GBps=PEAK_GBPS, W=W, E=E, dtype=str(DT), rows=[], checks=[], skipped=[])
    failed = False
    for gname, H, Hk, Hs, d, D, F in GEOMETRIES:
        for target in BATCH_HEADS:
            if time.time() - t0 > budget:
                result["skipped"].append(f"{gname} BH~{target}: time budget {budget:.0f} s spent")
                print(f"skip {gname} BH~{target}: time budget spent", flush=True)
                continue
            B = max(1, round(target / H))
            g = torch.Generator(device=DEV).manual_seed(0)
            # check: positions below, at and above W per row
            pos = torch.randint(0, 3 * W, (B,), device=DEV, generator=g, dtype=torch.int64).to(torch.int32)
            pos[: min(B, 3)] = torch.tensor([W // 2, W, 2 * W], device=DEV, dtype=torch.int32)[: min(B, 3)]
            L = make_layer(B, H, Hk, Hs, d, D, F, g, pos)
            try:
                checks = check(L)
            except Exception as e:  # noqa: BLE001 - report, keep going
                checks = {"error": f"{type(e).__name__}: {e}"[:300]}
                failed = True
            del L
            for name, c in checks.items():
                if name == "error":
                    print(f"check {gname} B={B}: ERROR {c}", flush=True)
                    continue
                if name == "fused":  # the old path against the torch step only
                    status = "PASS" if c["pass_vs_torch"] else "FUSED-OFF"
                else:  # a new option must equal the fused path (or, where that is off, the torch step)
                    status = "PASS" if c["pass_vs_fused"] else ("DIFF-FUSED" if c["pass_vs_torch"] else "FAIL")
                failed |= status == "FAIL"
                result["checks"].append(dict(geometry=gname, B=B, BH=B * H, option=name, status=status, **c))
                f_, t_ = c["fused"], c["torch"]
                print(f"check {gname:<10} BH={B * H:<5} {name:<10} {status:<10} vs fused o {f_['o']:.1e} "
                      f"S {f_['S']:.1e} z {f_['z']:.1e} caches {f_['caches_equal']}; vs torch o {t_['o']:.1e} "
                      f"S {t_['S']:.1e} z {t_['z']:.1e} caches {t_['caches_equal']}", flush=True)
            # timing: L layers of distinct buffers, positions above the window
            nbytes = step_bytes(B, H, Hk, Hs, d, D, F)
            per_layer = 4 * B * Hs * (F * D + F) + 2 * B * (Hk * W * (d + D) + Hs * W * F)
            n_layers = max(2, min(64, math.ceil(256e6 / per_layer)))
            pos = torch.randint(W, 64 * W, (B,), device=DEV, generator=g, dtype=torch.int64).to(torch.int32)
            layers = [make_layer(B, H, Hk, Hs, d, D, F, g, pos) for _ in range(n_layers)]
            for name, launch in OPTIONS:
                if time.time() - t0 > budget:
                    result["skipped"].append(f"{gname} BH={B * H} {name}: time budget spent")
                    continue
                row = dict(geometry=gname, H=H, Hk=Hk, Hs=Hs, d=d, D=D, F=F, W=W, E=E, B=B, BH=B * H, option=name,
                           launch=repr(launch), layers=n_layers, bytes_per_step=nbytes)
                try:
                    us = time_graph(layers, launch)
                    row.update(us_per_step=us, GBps=nbytes / us / 1e3, pct_peak=100 * nbytes / us / 1e3 / PEAK_GBPS)
                except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                result["rows"].append(row)
            del layers
            torch.cuda.empty_cache()
    # table
    print(f"\n{'geometry':<10} {'BH':>5} {'option':<10} {'us/step':>9} {'GB/s':>7} {'%peak':>6} {'x fused':>8}")
    fused_us = {(r["geometry"], r["BH"]): r.get("us_per_step") for r in result["rows"] if r["option"] == "fused"}
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['geometry']:<10} {r['BH']:>5} {r['option']:<10} ERROR {r['error']}"[:200])
            continue
        f_us = fused_us.get((r["geometry"], r["BH"]))
        r["speedup_vs_fused"] = f_us / r["us_per_step"] if f_us else None
        sp = f"{r['speedup_vs_fused']:.2f}" if r["speedup_vs_fused"] else "-"
        print(f"{r['geometry']:<10} {r['BH']:>5} {r['option']:<10} {r['us_per_step']:>9.2f} {r['GBps']:>7.0f} "
              f"{r['pct_peak']:>6.1f} {sp:>8}")
    result["wall_s"] = time.time() - t0
    result["all_checks_pass"] = not failed
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out_path} ({result['wall_s']:.0f} s); checks {'PASS' if not failed else 'FAIL'}"
          + (f"; skipped {len(result['skipped'])}" if result["skipped"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
