"""One-token feature maps at decode batch sizes (#13): the fused Hedgehog kernel against the PyTorch reference on
[B, heads, 1, 64] inputs, SmolLM2-135M's query (9) and key (3) heads, bf16. The 2026-12-02 decode profile found
the fused kernel at 195 us per call at batch 4,096 (11.7 ms of a 34.6 ms step), when each one-token sequence was a
program of its own; since then a one-token call tiles a head's sequences as its rows (``_rows`` in fused.py). This
times that against the reference (a batched GEMM). Measured 2026-12-02 (docs/benchmarks.md): 0.13-0.17 ms per call
with launch overhead, against the reference's 0.24-0.40 ms.
    python benchmarks/diagnoses/gpu_onetoken_features.py OUT.json [BATCHES=1,64,1024,4096]"""
import json

import torch

from linearize.kernels.feature_maps import hedgehog_features


def _ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(out: str, batches: list[int]) -> None:
    rows = []
    for B in batches:
        for heads in (9, 3):
            x = torch.randn(B, heads, 1, 64, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(heads, 64, 64, device="cuda") / 8
            b = torch.zeros(heads, 64, device="cuda")
            ref = hedgehog_features(x, w, b, backend="torch")
            fused = hedgehog_features(x, w, b, backend="triton")
            row = {"batch": B, "heads": heads,
                   "torch_ms": _ms(lambda: hedgehog_features(x, w, b, backend="torch")),
                   "triton_ms": _ms(lambda: hedgehog_features(x, w, b, backend="triton")),
                   "max_abs_diff": (ref.float() - fused.float()).abs().max().item()}
            print(row, flush=True)
            rows.append(row)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", metavar="OUT.json")
    ap.add_argument("batches", nargs="?", default="1,64,1024,4096", help="comma-separated (default 1,64,1024,4096)")
    a = ap.parse_args()
    main(a.out, [int(b) for b in a.batches.split(",")])
