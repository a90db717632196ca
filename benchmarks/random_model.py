"""A random-weight model with a real 7-8B architecture's shapes, saved as a Hugging Face folder (with a tokenizer)
for the 7B-scale measurements of #14: no real 7B weights exist offline, and speed and memory do not depend on the
values.

    python benchmarks/random_model.py llama-3-8b OUT --gpt2-tokenizer ../shared/data/gpt2-tokenizer
    python benchmarks/random_model.py llama-2-7b OUT --tokenizer ../shared/data/stories260K-hf
    python benchmarks/random_model.py tiny OUT --tokenizer ../shared/data/stories260K-hf       # CPU dry run

Prints one JSON line: shape, parameters, bytes written, seconds to build and to save.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from linearize.bench.shapes import SHAPES


def _tokenizer(args):
    if args.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer)
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    d = Path(args.gpt2_tokenizer)
    bpe = ByteLevelBPETokenizer(str(d / "encoder.json"), str(d / "vocab.bpe"))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", help="a tokenizer folder (its ids must fit the shape's vocabulary)")
    ap.add_argument("--gpt2-tokenizer", help="a folder with GPT-2's encoder.json and vocab.bpe")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not (args.tokenizer or args.gpt2_tokenizer):
        ap.error("give --tokenizer or --gpt2-tokenizer")
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = _tokenizer(args)
    cfg = LlamaConfig(**SHAPES[args.shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if len(tok) > cfg.vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tok)} tokens, more than {args.shape}'s {cfg.vocab_size}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(args.out, max_shard_size="5GB")
    tok.save_pretrained(args.out)
    save = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(json.dumps({"shape": args.shape, "parameters": sum(p.numel() for p in model.parameters()),
                      "bytes": size, "build_s": round(build, 1), "save_s": round(save, 1)}))


if __name__ == "__main__":
    main()
