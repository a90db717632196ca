#!/usr/bin/env bash
# 2026-12-07: #27's state-form / training / selection ablation on SmolLM2-135M-Instruct as one
# instance per variant of benchmarks/gpu_ablate_smollm2.sh sharing one GPU, then (once GEMMA.ready exists beside GEMMA: the
# caller stages it in parts meanwhile) #29's Gemma 3 270M global-only and all-layers conversions as two more.
#   bash benchmarks/sessions/gpu_session_recall.sh SMOLLM2_GGUF GEMMA_GGUF DATA_ROOT OUT
# DATA_ROOT: data/{wikitext-raw/wiki.valid.raw,llm-foundry-icl/*.jsonl}; GENERAL: the stage-1 text (file list).
# Progress: OUT/chain.log; poll with benchmarks/sessions/gpu_collect.sh OUT DEST.
set -uo pipefail
cd "$(dirname "$0")/../.."
GGUF="$1"; GEMMA="$2"; ROOT="$3"; OUT="$4"
mkdir -p "$OUT/ablation" "$OUT/gemma"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"
export TOKENS1="${TOKENS1:-1000000}" TASKS="${TASKS:-ppl,mc,distance,passkey,mqar}" MAX_TOKENS="${MAX_TOKENS:-131072}"
export BATCH="${BATCH:-16}"
lane() {  # COMPARE VARIANTS...
  local compare=$1; shift
  COMPARE="$compare" VARIANTS="$*" bash benchmarks/gpu_ablate_smollm2.sh "$GGUF" "$ROOT" "$OUT/ablation" \
    > "$OUT/ablation/lane-${1}.log" 2>&1
  log "lane $* rc=$?"
}
# One variant per lane, all at once (a lane per variant keeps the GPU busy with small models; the first one also
# scores the teacher). LANES overrides the list.
first=1
for v in ${LANES:-additive gated-delta unrotated gated-delta+unrotated seq2048 gated-delta+seq2048 sm3-kl sm3-recall wdrop25 gated-delta+wdrop25}; do
  if [ "$first" = 1 ]; then lane 1 "$v" & first=0; else lane "" "$v" & fi
done
( while [ ! -f "$GEMMA.ready" ]; do sleep 5; done
  log "gemma staged"
  bash benchmarks/gpu_gemma3_270m.sh "$GEMMA" "$ROOT" "$OUT/gemma" > "$OUT/gemma/lane.log" 2>&1
  log "gemma rc=$?" ) &
wait
python3 benchmarks/recall_table.py "$OUT/ablation" > "$OUT/ablation/recall_table.md" 2>&1
log "done"
