"""Where the Triton hybrid attention's time goes: CUDA time per kernel / op for one forward + backward at the
reference size (B=2, H=16, Hk=4, T=16k, D=F=128, W=64, bf16), from torch.profiler.

    python benchmarks/diagnoses/profile_backward.py [--window 0] [--seq-len 8192] [--check]

``--check`` first compares every gradient of a T=2048 bf16 call with the fp32 PyTorch reference on the same inputs.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from linearize.bench.kernels import reference_inputs
from linearize.kernels.hybrid.chunk import hybrid_attention_triton
from linearize.kernels.hybrid.naive import hybrid_attention_chunked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.check:
        check(a.window)
    B, H, Hk, T, D, W = 2, 16, 4, a.seq_len, 128, a.window
    q, k, v, fq, fk, gamma = reference_inputs(B, H, Hk, T, D)
    leaves = [x.requires_grad_() for x in (q, k, v, fq, fk, gamma)]
    do = torch.randn_like(q) * 0.5

    def step():
        for x in leaves:
            x.grad = None
        o, _ = hybrid_attention_triton(q, k, v, fq, fk, gamma if W else None, window=W, scale=D**-0.5)
        o.backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"B={B} H={H} Hk={Hk} T={T} D=F={D} W={W} bf16, 5 fwd+bwd steps; CUDA time per kernel (total over 5):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


def check(W: int) -> None:
    B, H, Hk, T, D = 2, 16, 4, 2048, 128
    *base, _ = reference_inputs(B, H, Hk, T, D, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    gamma = torch.sigmoid(torch.randn(H, device="cuda", generator=g) - 2)
    do = torch.randn(B, H, T, D, device="cuda", generator=g)
    grads = {}
    for name, fn, cast in (("ref", hybrid_attention_chunked, torch.float32), ("tri", hybrid_attention_triton, None)):
        xs = [(x.float() if cast else x).clone().requires_grad_() for x in base] + [gamma.clone().requires_grad_()]
        o, _ = fn(*xs[:5], xs[5] if W else None, window=W, scale=D**-0.5)
        (o.float() * do).sum().backward()
        grads[name] = [o.detach()] + [x.grad for x in xs[: 6 if W else 5]]
    names = ["o", "dq", "dk", "dv", "dfq", "dfk", "dgamma"]
    errs = [((t.float() - r).norm() / r.norm()).item() for t, r in zip(grads["tri"], grads["ref"])]
    print("check T=2048 bf16 vs fp32 reference:", " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs)), flush=True)


if __name__ == "__main__":
    main()
