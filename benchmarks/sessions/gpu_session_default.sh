#!/usr/bin/env bash
# 2026-12-07 (later): what users actually run, for #27 item 5's default. Three lanes of benchmarks/gpu_ablate_smollm2.sh
# sharing one GPU, each with the teacher and both baselines: `linearize convert GGUF` with no flags (then the same
# export with a 64-pair global cache), the same with --state-budget 25%, with 1M sampled tokens, and recipes/smollm2-135m as shipped; meanwhile
# the GPU tests of the Gemma 3 geometry (head_dim 256, #29's broken GPU export).
#   bash benchmarks/sessions/gpu_session_default.sh SMOLLM2_GGUF DATA_ROOT OUT
# DATA_ROOT: data/{wikitext-raw/wiki.valid.raw,llm-foundry-icl/*.jsonl}; GENERAL / INSTRUCT: the recipe's stage-1 and
# LoRA text (file lists). Progress: OUT/chain.log; poll with benchmarks/sessions/gpu_collect.sh OUT DEST.
set -uo pipefail
cd "$(dirname "$0")/../.."
GGUF="$1"; ROOT="$2"; OUT="$3"
mkdir -p "$OUT/ablation"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"
export TASKS="${TASKS:-ppl,mc,distance,passkey,mqar}" MAX_TOKENS="${MAX_TOKENS:-131072}" BATCH="${BATCH:-16}"
lane() {  # VARIANTS...
  COMPARE=1 VARIANTS="$*" bash benchmarks/gpu_ablate_smollm2.sh "$GGUF" "$ROOT" "$OUT/ablation" \
    > "$OUT/ablation/lane-${1}.log" 2>&1
  log "lane $* rc=$?"
}
( python3 -m pytest tests/gpu -k gemma3 -q -p no:cacheprovider > "$OUT/gpu-tests-gemma3.log" 2>&1
  log "gpu tests (gemma3) rc=$?" ) &
IFS=';' read -ra lanes <<< "${LANES:-default gc64@default;default+budget25;default+tokens1m;recipe}"  # lanes split by ';'
for l in "${lanes[@]}"; do lane $l & done
wait
python3 benchmarks/recall_table.py "$OUT/ablation" > "$OUT/ablation/recall_table.md" 2>&1
log "done"
