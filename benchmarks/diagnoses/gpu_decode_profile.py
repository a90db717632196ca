"""Where a decode step's time goes (#13): the linearized SmolLM2-135M geometry (random weights, bf16, hybrid Hedgehog
W=WINDOW + 4 sinks, fused kernels) after a real prefill of 128 tokens, per batch size:
  * the step through the model's CUDA graph (what generate() runs): median ms of 50 replays;
  * the same step eager under torch.profiler: CUDA kernels per step and their summed device time, and the 25 kernels
    with the most device time, so that (graph step - summed kernel time) is the part the kernels' own count costs
    (each kernel's launch and tail inside the graph) and the table says which kernels to fuse or speed up.
With --compile the model's ``compile_decode`` switch is also timed (when this linearize version has it).
    python benchmarks/diagnoses/gpu_decode_profile.py OUT.json [BATCHES=1,64,4096] [WINDOW=64] [--compile]"""
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from linearize.bench.generate import _random_models, smollm2_geometry
from linearize.bench.sweep import _prefill, _steps
from linearize.models.base import cache_kwarg_of


def _graph_step_ms(model, cache, tok, kw) -> float:
    """Median of 50 steps after 4 (the eager first step, the warm-up and the capture among them)."""
    return _steps(lambda: model(tok, **{kw: cache}, use_cache=True), "cuda", 4, 50)


def _prefilled(model, B: int, P: int = 128):
    _, cache, tok, _ = _prefill(model, B, P, "cuda")
    return cache, tok


@torch.no_grad()
def main(out_path: str, batches: list[int], window: int) -> None:
    _, model = _random_models(smollm2_geometry(), window, "hedgehog", torch.bfloat16, "cuda", sinks=4)
    kw = cache_kwarg_of(type(model))
    rows = []
    for B in batches:
        row: dict = {"batch": B, "window": window}
        model.cuda_graphs = True
        cache, tok = _prefilled(model, B)
        row["graph_step_ms"] = _graph_step_ms(model, cache, tok, kw)
        if hasattr(model, "compile_decode") and "--compile" in sys.argv:
            model.compile_decode = True
            cache, tok = _prefilled(model, B)
            try:
                row["compiled_graph_step_ms"] = _graph_step_ms(model, cache, tok, kw)
            except Exception as e:  # report, keep the other rows
                row["compiled_graph_step_ms"] = f"failed: {type(e).__name__}: {e}"[:300]
            model.compile_decode = False
        model.cuda_graphs = False
        cache, tok = _prefilled(model, B)
        for _ in range(3):
            model(tok, **{kw: cache}, use_cache=True)
        torch.cuda.synchronize()
        steps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(tok, **{kw: cache}, use_cache=True)
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        row["kernels_per_step"] = len(events) / steps
        row["kernel_ms_per_step"] = sum(e.device_time for e in events) / steps / 1e3
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        row["top"] = table
        print(f"batch {B}: graph step {row['graph_step_ms']:.3f} ms"
              + (f", compiled {row['compiled_graph_step_ms']}" if "compiled_graph_step_ms" in row else "")
              + f"; eager: {row['kernels_per_step']:.0f} kernels, {row['kernel_ms_per_step']:.3f} ms of kernels per step",
              flush=True)
        print(table, flush=True)
        rows.append(row)
        del cache, tok
        torch.cuda.empty_cache()
    model.cuda_graphs = True
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", metavar="OUT.json")
    ap.add_argument("batches", nargs="?", default="1,64,4096", help="comma-separated (default 1,64,4096)")
    ap.add_argument("window", nargs="?", type=int, default=64, help="default 64")
    ap.add_argument("--compile", action="store_true", help="also time the model's compile_decode switch")
    a = ap.parse_args()
    main(a.out, [int(b) for b in a.batches.split(",")], a.window)
