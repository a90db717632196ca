"""A linearized export with random weights in SmolLM2-135M-Instruct's shapes and a given layout, for the throughput
sweep where the real GGUF cannot travel (#28: a decode step's cost does not depend on the weights' values; it
depends on the layout: window, sinks, softmax layers, global cache). The tokenizer is stories260K's (the sweep feeds
random token ids; only the loader needs one).

    python benchmarks/random_export.py OUT --tokenizer ../shared/data/stories260K-hf [--window 256] [--sinks 4]
        [--softmax-layers 0,1,2] [--global-cache 64] [--window-only-layers 0-5,8] [--layers 30]

Prints one JSON line: the layout, parameters and seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearize.bench.generate import smollm2_geometry
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from linearize.modules.config import LinearAttentionConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--softmax-layers", default="")
    ap.add_argument("--global-cache", type=int, default=0)
    ap.add_argument("--window-only-layers", default="", help="layers whose linear part is off (ranges a-b allowed)")
    ap.add_argument("--layers", type=int, default=30, help="number of layers (30 = SmolLM2-135M; fewer: a dry run)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_geometry(num_hidden_layers=a.layers)).to(torch.bfloat16).eval()
    softmax = [int(i) for i in a.softmax_layers.split(",") if i.strip()]
    window_only = [i for part in a.window_only_layers.split(",") if part.strip()
                   for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
    cfg = LinearAttentionConfig.build(window=a.window, sinks=a.sinks, softmax_layers=softmax,
                                      global_cache=a.global_cache, window_only_layers=window_only)
    model = linearize_model(model, cfg, teacher=None)
    save_linearized(model, a.out, tokenizer=AutoTokenizer.from_pretrained(a.tokenizer), overwrite=True)
    print(json.dumps({"out": a.out, "window": a.window, "sinks": a.sinks, "softmax_layers": softmax,
                      "global_cache": a.global_cache, "window_only_layers": window_only, "parameters": sum(p.numel() for p in model.parameters()),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
