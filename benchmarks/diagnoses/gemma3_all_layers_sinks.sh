#!/usr/bin/env bash
# Why `--layers all` fails on Gemma 3 270M past 512 tokens (#29; docs/convert.md): the same small CPU conversion of every
# layer with 4 sinks and with none, then perplexity by position on two 2,048-token blocks of WikiText-103 valid, each
# with its linear part off too. Measured 2026-12-07 (2-core CPU, transformers 5.25): positions 512-1023 at 157.9 with
# 4 sinks, 24.1 with none (linear part off); positions 0-255 the same.
#   bash benchmarks/diagnoses/gemma3_all_layers_sinks.sh GEMMA_GGUF DATA_JSONL WIKI_VALID_RAW OUT     # ~15 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF="${1:?usage: gemma3_all_layers_sinks.sh GEMMA_GGUF DATA_JSONL WIKI_VALID_RAW OUT}"; DATA="${2:?}"; WIKI="${3:?}"
OUT="${4:?}"; PY="${PYTHON:-python3}"
mkdir -p "$OUT"
for s in 4 0; do
  "$PY" -m linearize convert "$GGUF" --out "$OUT/s$s" --overwrite --layers all --sinks "$s" --window 256 \
    --tokens 8192 --seq-len 512 --batch-size 2 --data "$DATA" > "$OUT/convert-s$s.log" 2>&1
  "$PY" -m linearize eval "$OUT/s$s" --text "$WIKI" --tasks distance --distance-context 2048 --distance-tokens 4096 \
    --baselines linear-off --batch-size 1 --json-out "$OUT/eval-s$s.json" --overwrite > "$OUT/eval-s$s.txt" 2>&1
  tail -n 14 "$OUT/eval-s$s.txt"
done
