"""GPU benchmark of the decode step with a sparse global cache (#27 item 3, #28): the fused Triton kernel
(``global_decode_step(..., backend="triton")``, ``kernels/hybrid/global_decode.py``) against its PyTorch reference
(``backend="torch"``) and against the hybrid decode step without a global cache (``hybrid_decode_step``, the fused
kernel every model without one runs).

    python3 benchmarks/gpu_global_decode.py OUT.json [--max-seconds S]   # default budget 120 s

SmolLM2-135M's attention (H = 9 query heads, Hk = Hs = 3 kv / state heads, d = D = 64, hedgehog F = 128), the
default conversion's W 256 + 4 sinks, K = 64 members, bf16 tokens / caches, fp32 state; B in (1, 64, 512, 2048),
positions above the window. Check first (eager, 4 steps from one state): the Triton step's output against the
PyTorch step's (relative Frobenius error), the state, the ring buffers and the global set (positions and scores).
Timing: one step of each of L "layers" (separate buffers spanning >= 256 MB, so no step finds its state in L2)
captured in one CUDA graph; median of 15 replays after 3 warm-up replays; per step = replay / L.

Bytes per step that must move (the effective bandwidth's numerator): fp32 state read + written
``2 * 4 * (F * D + F)`` per state head; the window's W - 1 cached keys and values ``(W - 1) * (d + D) * 2`` per key
head and the leaving key's phi(k) ``2 F`` per state head; the sinks; for the global cache its K keys and values
``K * (d + D) * 2`` per key head, K phi(k) ``2 K F`` per state head, positions and scores ``12 K`` per key head; the
new token's q, k, v, fq, fk; the new slots and o written. The copy bandwidth of the same GPU is measured in the run
(``bench/roofline.measure_copy_bandwidth``).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

DEV = "cuda"
H, HK, HS, DK, DV, F = 9, 3, 3, 64, 64, 128
W, E, K = 256, 4, 64
DT = torch.bfloat16
BATCHES = (1, 64, 512, 2048)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def step_bytes(B: int, K: int) -> int:
    state = 2 * 4 * (F * DV + F) * B * HS
    window = (W - 1) * (DK + DV) * 2 * B * HK + 2 * F * B * HS
    sinks = E * (DK + DV) * 2 * B * HK + 8 * E * B * HK
    members = K * (DK + DV) * 2 * B * HK + 2 * K * F * B * HS + 12 * K * B * HK
    inputs = 2 * B * (H * (DK + F) + HK * (DK + DV) + HS * F)
    writes = 2 * B * (HK * (DK + DV) + HS * F) + 2 * B * H * DV
    return state + window + sinks + members + inputs + writes


def make_layer(B: int, g: torch.Generator) -> dict:
    r = lambda *s: (torch.randn(*s, device=DEV, generator=g) * 0.5).to(DT)  # noqa: E731
    sm = lambda *s: torch.softmax(torch.randn(*s, device=DEV, generator=g), -1).to(DT)  # noqa: E731
    pos = torch.randint(W + K, 64 * W, (B,), device=DEV, generator=g)
    gpos = (pos[:, None, None] - W - torch.arange(1, K + 1, device=DEV)).expand(B, HK, K).contiguous()
    return dict(
        q=r(B, H, 1, DK), k=r(B, HK, 1, DK), v=r(B, HK, 1, DV), fq=sm(B, H, 1, F), fk=sm(B, HS, 1, F),
        gamma=torch.full((H,), 0.1, device=DEV),
        S=torch.rand(B, HS, F, DV, device=DEV, generator=g) * 0.1, z=torch.rand(B, HS, F, device=DEV, generator=g) + 1,
        kc=r(B, HK, W, DK), vc=r(B, HK, W, DV), fc=sm(B, HS, W, F),
        sinks=(r(B, HK, E, DK), r(B, HK, E, DV), torch.arange(E, device=DEV).repeat(B, 1)),
        gset=(r(B, HK, K, DK), r(B, HK, K, DV), sm(B, HS, K, F), gpos,
              torch.rand(B, HK, K, device=DEV, generator=g)),
        pos=pos, scale=DK**-0.5,
    )


def clone(L: dict) -> dict:
    out = {}
    for name, x in L.items():
        out[name] = tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone() if torch.is_tensor(x) else x
    return out


def step(L: dict, backend: str, K: int):
    from linearize.kernels.hybrid.decode import hybrid_decode_step
    from linearize.kernels.hybrid.global_cache import global_decode_step

    common = dict(state=(L["S"], L["z"]), k_cache=L["kc"], v_cache=L["vc"], fk_cache=L["fc"], pos=L["pos"],
                  window=W, scale=L["scale"], sinks=L["sinks"])
    args = (L["q"], L["k"], L["v"], L["fq"], L["fk"], L["gamma"])
    if K == 0:
        return hybrid_decode_step(*args, **common)
    return global_decode_step(*args, **common, global_set=L["gset"], backend=backend)


def check(B: int, steps: int = 4) -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)
    L0 = make_layer(B, g)
    runs = {}
    for backend in ("torch", "triton"):
        L = clone(L0)
        outs = []
        for _ in range(steps):
            outs.append(step(L, backend, K).float().clone())
            L["pos"] += 1
        runs[backend] = (torch.cat(outs, 2), L)
    (ot, Lt), (ox, Lx) = runs["torch"], runs["triton"]
    return dict(B=B, o=rel(ox, ot), S=rel(Lx["S"], Lt["S"]), z=rel(Lx["z"], Lt["z"]),
                rings_equal=all(torch.equal(Lx[n], Lt[n]) for n in ("kc", "vc", "fc")),
                members_equal=torch.equal(Lx["gset"][3], Lt["gset"][3]),
                scores=rel(Lx["gset"][4].nan_to_num(), Lt["gset"][4].nan_to_num()))


def time_graph(layers: list[dict], backend: str, K: int) -> float:
    """us per layer and step: one step of every layer in one CUDA graph (``graph_replay_us``) over the layer count."""
    from linearize.bench.kernels import graph_replay_us

    return graph_replay_us(lambda: [step(L, backend, K) for L in layers]) / len(layers)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import triton

    from linearize.bench.roofline import measure_copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_path", metavar="OUT.json")
    ap.add_argument("--max-seconds", type=float, default=120.0)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; run it on a GPU host", file=sys.stderr)
        return 2
    t0 = time.time()
    copy_gbps = measure_copy_bandwidth(DEV) / 1e9
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  copy_GBps=copy_gbps, H=H, Hk=HK, Hs=HS, d=DK, D=DV, F=F, W=W, E=E, K=K, checks=[], rows=[],
                  skipped=[])
    print(f"GPU {result['device']} torch {torch.__version__} triton {triton.__version__}; copy {copy_gbps:.0f} GB/s",
          flush=True)
    for B in (1, 64):
        c = check(B)
        result["checks"].append(c)
        print(f"check B={B}: o {c['o']:.1e} S {c['S']:.1e} z {c['z']:.1e} rings {c['rings_equal']} members "
              f"{c['members_equal']} scores {c['scores']:.1e}", flush=True)
    for B in BATCHES:
        per_layer = 4 * B * HS * (F * DV + F) + 2 * B * (HK * (W + K) * (DK + DV) + HS * (W + K) * F)
        n_layers = max(2, min(64, math.ceil(256e6 / per_layer)))
        g = torch.Generator(device=DEV).manual_seed(1)
        layers = [make_layer(B, g) for _ in range(n_layers)]
        for name, backend, k in (("hybrid (no global cache), triton", "triton", 0),
                                 ("global cache 64, torch", "torch", K), ("global cache 64, triton", "triton", K)):
            if time.time() - t0 > a.max_seconds:
                result["skipped"].append(f"B={B} {name}: time budget spent")
                continue
            us = time_graph(layers, backend, k)
            nbytes = step_bytes(B, k)
            row = dict(B=B, kernel=name, layers=n_layers, us_per_step=us, bytes_per_step=nbytes,
                       GBps=nbytes / us / 1e3, of_copy=nbytes / us / 1e3 / copy_gbps)
            result["rows"].append(row)
            print(f"B={B:<5} {name:<34} {us:9.1f} us  {row['GBps']:7.0f} GB/s  {100 * row['of_copy']:5.1f} % of copy",
                  flush=True)
        del layers
        torch.cuda.empty_cache()
    with open(a.out_path, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
