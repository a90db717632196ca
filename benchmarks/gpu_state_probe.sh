#!/usr/bin/env bash
# A short probe of one state form on SmolLM2-135M-Instruct (#27): convert on the shipped English calibration text
# with a small token budget, then perplexity by position in 4k blocks and passkey, next to the same export with its
# linear part off (the StreamingLLM-equivalent row before any LoRA). Sized for a few minutes of GPU.
#   bash benchmarks/gpu_state_probe.sh GGUF WIKI_RAW OUT [convert flags...]
#   e.g. ... OUT --state-update gated-delta
# Knobs: TOKENS=40000, SEQ=1024, DIST_TOKENS=32768, PASSKEY=1024,4096.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF="${1:?usage: gpu_state_probe.sh GGUF WIKI_RAW OUT [convert flags]}"; WIKI="${2:?}"; OUT="${3:?}"; shift 3
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
t0=$(date +%s)
"$PY" -m linearize convert "$GGUF" --out "$OUT/export" --overwrite --data linearize/data/text/calibration-en.jsonl \
  --tokens "${TOKENS:-40000}" --seq-len "${SEQ:-1024}" "$@" > "$OUT/convert.log" 2>&1
echo "convert $(( $(date +%s) - t0 )) s" | tee -a "$OUT/probe.log"
t0=$(date +%s)
"$PY" -m linearize eval "$OUT/export" --baselines linear-off --text "$WIKI" --tasks distance,passkey \
  --distance-tokens "${DIST_TOKENS:-32768}" --passkey-contexts "${PASSKEY:-1024,4096}" --passkey-samples 2 \
  --batch-size 8 --json-out "$OUT/eval.json" --overwrite > "$OUT/eval.txt" 2> "$OUT/eval.log"
echo "eval $(( $(date +%s) - t0 )) s" | tee -a "$OUT/probe.log"
cat "$OUT/eval.txt"
