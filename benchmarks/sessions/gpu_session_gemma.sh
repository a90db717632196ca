#!/usr/bin/env bash
# 2026-12-07 (fourteenth session): #29's Gemma 3 270M table with transformers >= 5.25 (5.17 converts Gemma 3's GGUF
# tokenizer inconsistently), beside a SmolLM2 lane for #27 and, once every lane is done, #28's sweep of the layouts
# users get. Lanes sharing one GPU (each with its own log; convert times are shared-GPU times):
#   Gemma (benchmarks/gpu_gemma3_270m.sh under GEMMA_PYTHON), one lane per GEMMA_VARIANTS entry (default
#   "global all"; add "recipe" for recipes/gemma3-270m); the first also scores the teacher and StreamingLLM;
#   SmolLM2 (benchmarks/gpu_ablate_smollm2.sh, python3), one lane of SMOL_VARIANTS (default: `linearize convert GGUF`
#   with no flags, then its export with a 64-pair global cache; + the teacher and StreamingLLM);
#   meanwhile the GPU tests of the kept softmax layers' static decode step (graphs on vs off) and of the models.
# Then, alone on the GPU, `linearize bench sweep` (linear rows, 4k and 32k generations) on two untrained exports of
# SmolLM2 (`--tokens 0`: the weights do not change a step's cost): the default layout (W 256 + 4 sinks, every layer
# linear) and the recipe's (the same with softmax layers 0, 1, 2, the layers its KL selection keeps).
#   bash benchmarks/sessions/gpu_session_gemma.sh SMOLLM2_GGUF GEMMA_GGUF DATA_ROOT OUT
# DATA_ROOT: data/{wikitext-raw/wiki.valid.raw,llm-foundry-icl/*.jsonl}; GENERAL: stage-1 text (file list).
# Progress: OUT/chain.log; poll with benchmarks/sessions/gpu_collect.sh OUT DEST.
set -uo pipefail
cd "$(dirname "$0")/../.."
SMOL="$1"; GEMMA="$2"; ROOT="$3"; OUT="$4"
GPY="${GEMMA_PYTHON:-python3}"
mkdir -p "$OUT/gemma" "$OUT/ablation" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start; gemma python: transformers $("$GPY" -c 'import transformers; print(transformers.__version__)')"
export MAX_TOKENS="${MAX_TOKENS:-131072}" BATCH="${BATCH:-16}"
( python3 -m pytest tests/gpu/test_gpu_kept_softmax.py tests/gpu/test_gpu_model.py -q -p no:cacheprovider \
    > "$OUT/gpu-tests.log" 2>&1; log "gpu tests (kept softmax layers, models) rc=$?" ) &
compare=1
for v in ${GEMMA_VARIANTS:-global all}; do
  ( COMPARE="$compare" VARIANTS="$v" PYTHON="$GPY" TASKS=ppl,mc,distance,passkey,mqar \
      bash benchmarks/gpu_gemma3_270m.sh "$GEMMA" "$ROOT" "$OUT/gemma" > "$OUT/gemma/lane-$v.log" 2>&1
    log "gemma $v rc=$?" ) &
  compare=""
done
( COMPARE=1 TASKS=ppl,distance,passkey,mqar VARIANTS="${SMOL_VARIANTS:-default gc64@default}" \
    bash benchmarks/gpu_ablate_smollm2.sh "$SMOL" "$ROOT" "$OUT/ablation" > "$OUT/ablation/lane.log" 2>&1
  log "smollm2 rc=$?" ) &
for layout in default:"" recipe:"--softmax-layers 0,1,2"; do  # untrained exports for the sweep
  python3 -m linearize convert "$SMOL" --tokens 0 --out "$OUT/sweep/${layout%%:*}/export" --overwrite ${layout#*:} \
    > "$OUT/sweep/${layout%%:*}-convert.log" 2>&1
  log "sweep export ${layout%%:*} rc=$?"
done
wait
python3 benchmarks/recall_table.py "$OUT/ablation" > "$OUT/ablation/recall_table.md" 2>&1
python3 benchmarks/recall_table.py "$OUT/gemma" > "$OUT/gemma/recall_table.md" 2>&1
for m in default recipe; do
  log "sweep $m"
  python3 -m linearize bench sweep "$OUT/sweep/$m/export" --lengths "${SWEEP_LENGTHS:-4096,32768}" --models linear \
    --max-batch "${SWEEP_MAX_BATCH:-16384}" --json "$OUT/sweep/$m.json" --plots "$OUT/sweep/$m" --overwrite \
    > "$OUT/sweep/$m.txt" 2>&1
  log "sweep $m rc=$?"
done
log "done"
