#!/usr/bin/env bash
# 2026-12-07 (fourteenth session): #29's Gemma 3 270M table with transformers >= 5.25 (5.17 converts Gemma 3's GGUF
# tokenizer inconsistently), beside two SmolLM2 lanes for #27 and, once every lane is done, #28's sweep of the real
# exports. Lanes sharing one GPU (each with its own log; convert times are shared-GPU times):
#   Gemma (benchmarks/gpu_gemma3_270m.sh, GEMMA_PYTHON): global-only (+ the teacher and StreamingLLM), all layers,
#   recipes/gemma3-270m (global-only + LoRA);
#   SmolLM2 (benchmarks/gpu_ablate_smollm2.sh, python3): `linearize convert GGUF` with no flags, then its export with a
#   64-pair global cache (+ the teacher and StreamingLLM); recipes/smollm2-135m as shipped (with zero-shot tasks).
#   Then `linearize bench sweep` on the default export and on the recipe's (its 3 softmax layers), linear rows.
#   Meanwhile the GPU tests of the kept softmax layers' static decode step (graphs on vs off) and of the models.
#   bash benchmarks/sessions/gpu_session_gemma.sh SMOLLM2_GGUF GEMMA_GGUF DATA_ROOT OUT
# DATA_ROOT: data/{wikitext-raw/wiki.valid.raw,llm-foundry-icl/*.jsonl}; GENERAL / INSTRUCT: stage-1 and LoRA text
# (file lists). Progress: OUT/chain.log; poll with benchmarks/sessions/gpu_collect.sh OUT DEST.
set -uo pipefail
cd "$(dirname "$0")/../.."
SMOL="$1"; GEMMA="$2"; ROOT="$3"; OUT="$4"
GPY="${GEMMA_PYTHON:-python3}"
mkdir -p "$OUT/gemma" "$OUT/ablation" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start; gemma python: $("$GPY" -c 'import transformers; print(transformers.__version__)')"
export MAX_TOKENS="${MAX_TOKENS:-131072}" BATCH="${BATCH:-16}"
gemma() {  # COMPARE VARIANT
  COMPARE="$1" VARIANTS="$2" PYTHON="$GPY" TASKS=ppl,mc,distance,passkey,mqar \
    bash benchmarks/gpu_gemma3_270m.sh "$GEMMA" "$ROOT" "$OUT/gemma" > "$OUT/gemma/lane-$2.log" 2>&1
  log "gemma $2 rc=$?"
}
smol() {  # COMPARE TASKS VARIANTS...
  local compare=$1 tasks=$2; shift 2
  COMPARE="$compare" TASKS="$tasks" VARIANTS="$*" bash benchmarks/gpu_ablate_smollm2.sh "$SMOL" "$ROOT" \
    "$OUT/ablation" > "$OUT/ablation/lane-$1.log" 2>&1
  log "smollm2 $* rc=$?"
}
( python3 -m pytest tests/gpu/test_gpu_kept_softmax.py tests/gpu/test_gpu_model.py -q -p no:cacheprovider \
    > "$OUT/gpu-tests.log" 2>&1; log "gpu tests (kept softmax layers, models) rc=$?" ) &
gemma 1 global & gemma "" all & gemma "" recipe &
smol 1 ppl,distance,passkey,mqar default gc64@default & smol "" ppl,mc,distance,passkey,mqar recipe &
wait
python3 benchmarks/recall_table.py "$OUT/ablation" > "$OUT/ablation/recall_table.md" 2>&1
python3 benchmarks/recall_table.py "$OUT/gemma" > "$OUT/gemma/recall_table.md" 2>&1
for m in default recipe; do
  export_dir="$OUT/ablation/$m/export"; [ "$m" = recipe ] && export_dir="$OUT/ablation/recipe/run/finetuned"
  [ -f "$export_dir/config.json" ] || { log "sweep $m: no export"; continue; }
  log "sweep $m"
  python3 -m linearize bench sweep "$export_dir" --lengths "${SWEEP_LENGTHS:-4096,32768}" --models linear \
    --max-batch "${SWEEP_MAX_BATCH:-16384}" --json "$OUT/sweep/$m.json" --plots "$OUT/sweep/$m" --overwrite \
    > "$OUT/sweep/$m.txt" 2>&1
  log "sweep $m rc=$?"
done
log "done"
