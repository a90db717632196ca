#!/usr/bin/env bash
# H200 run behind docs/benchmarks.md's "linearize eval" table: convert SmolLM2-135M-Instruct with the default
# settings (data-free: the teacher writes its own calibration text), then evaluate the conversion against its
# teacher with scripts/eval_smollm2.sh (WikiText valid perplexity, PIQA / ARC-e / Winogrande, passkey, MQAR).
#   bash benchmarks/gpu_eval_smollm2.sh GGUF DATA_ROOT OUT     # DATA_ROOT holds data/{wikitext-raw,llm-foundry-icl}
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF="${1:?usage: gpu_eval_smollm2.sh GGUF DATA_ROOT OUT}"; ROOT="${2:?}"; OUT="${3:?}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -m linearize convert "$GGUF" --out "$OUT/smollm2-linearized" --overwrite 2>&1 | tee "$OUT/convert.log"
echo "convert wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/convert.log"
start=$(date +%s)
LINEARIZE_SHARED="$ROOT" OUT="$OUT/eval" BATCH="${BATCH:-32}" PYTHON="$PY" \
  bash scripts/eval_smollm2.sh "$OUT/smollm2-linearized" "$GGUF" 2>&1 | tee "$OUT/eval.log"
echo "eval wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/eval.log"
