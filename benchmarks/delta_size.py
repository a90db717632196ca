"""The delta export's size for a real architecture, counted without weights: the model is built on PyTorch's meta
device (shapes only), linearized with the default settings, and the added parameters (what
``models/delta.py`` writes) are counted in the dtype the conversion exports them in.
    python benchmarks/delta_size.py llama-3-8b [llama-2-7b ...]"""

import torch

from linearize.bench.shapes import SHAPES
from linearize.convert.surgery import linearize_model
from linearize.models.delta import added_parameters
from linearize.modules.attention import LinearAttentionConfig


def main():
    import argparse

    from transformers import AutoModelForCausalLM, LlamaConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", metavar="SHAPE",
                    help=f"one of {', '.join(sorted(SHAPES))} (default: llama-2-7b llama-3-8b)")
    shapes = ap.parse_args().shapes or ["llama-2-7b", "llama-3-8b"]
    for bad in set(shapes) - set(SHAPES):
        ap.error(f"unknown shape {bad!r} (choose from {', '.join(sorted(SHAPES))})")
    for shape in shapes:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
            full = sum(p.numel() * p.element_size() for p in model.state_dict().values())
            model = linearize_model(model, LinearAttentionConfig(window=64, sinks=4))
        added = added_parameters(model)
        n = sum(t.numel() for t in added.values())
        size = sum(t.numel() * t.element_size() for t in added.values())
        dtypes = sorted({str(t.dtype) for t in added.values()})
        print(f"{shape}: {n:,} added parameters ({', '.join(dtypes)}) = {size / 2**20:.1f} MiB delta vs "
              f"{full / 2**30:.2f} GiB of bf16 base weights ({size / full:.4%})")


if __name__ == "__main__":
    main()
