"""GPU run for the conversion issue: real SmolLM2-135M-Instruct (GGUF), attention transfer on <= 5M tokens of
real English from shared/data/train-text, WikiText-103 *validation* perplexity of teacher vs student.

    python benchmarks/smollm2_transfer.py --gguf /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data .carry/train-text --wikitext .carry/wiki.valid.raw --tokens 2000000 --out-dir /tmp/runs

Prints one table row per variant as it finishes (wall clock, peak GPU memory, perplexities, KL) and writes
results JSON next to the runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from linearize.convert.config import ConvertConfig
from linearize.convert.pipeline import ConvertJob, convert
from linearize.eval import text_perplexity
from linearize.io.loading import load_model
from linearize.io.sources import ModelSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_NAME = "bfloat16" if DEVICE == "cuda" else "float32"
DTYPE = getattr(torch, DTYPE_NAME)

VARIANTS = {
    "hybrid-hedgehog-w64": dict(feature_map="hedgehog", window=64),
    "pure-hedgehog": dict(feature_map="hedgehog", window=0),
    "hybrid-based-w64": dict(feature_map="based", window=64),
    "pure-based": dict(feature_map="based", window=0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--wikitext", required=True)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--eval-tokens", type=int, default=None, help="cap on WikiText tokens (default: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out-dir", default="/tmp/runs")
    args = ap.parse_args()
    wiki = Path(args.wikitext).read_text()
    out_dir = Path(args.out_dir)
    results = []
    teacher, tok = load_model(args.gguf, dtype=DTYPE, device=DEVICE)
    t0 = time.perf_counter()
    ppl_t = text_perplexity(teacher, tok, wiki, context=args.seq_len, stride=args.seq_len,
                            max_tokens=args.eval_tokens)["ppl"]
    print(f"teacher WikiText-103 valid ppl {ppl_t:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    del teacher
    print("| variant | tokens | steps | wall s | peak GiB | ppl teacher | ppl student | ratio | val KL before | val KL after |", flush=True)
    for name in args.variants.split(","):
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opts = ConvertJob(
            model=ModelSpec(source=args.gguf, dtype=DTYPE_NAME, device=DEVICE), out=out_dir / name, overwrite=True,
            settings=ConvertConfig(**VARIANTS[name], loss=args.loss, lr=args.lr, batch_size=args.batch_size,
                                   checkpoint_every=0, data=args.data, tokens=args.tokens, seq_len=args.seq_len),
        )
        path = convert(opts, log=lambda m: print("  ", m, flush=True))
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
        rep = json.loads((path / "transfer_report.json").read_text())
        student, _ = load_model(str(path), dtype=DTYPE, device=DEVICE)
        ppl_s = text_perplexity(student, tok, wiki, context=args.seq_len, stride=args.seq_len,
                                max_tokens=args.eval_tokens)["ppl"]
        del student
        row = dict(variant=name, tokens=args.tokens, steps=rep["steps"], wall_s=wall, peak_gib=peak, ppl_teacher=ppl_t,
                   ppl_student=ppl_s, ratio=ppl_s / ppl_t, kl_before=rep["untrained"]["kl"], kl_after=rep["trained"]["kl"])
        results.append(row)
        print(f"| {name} | {args.tokens:,} | {rep['steps']} | {wall:.0f} | {peak:.1f} | {ppl_t:.2f} | {ppl_s:.2f} | "
              f"{ppl_s / ppl_t:.3f} | {row['kl_before']:.3f} | {row['kl_after']:.3f} |", flush=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
