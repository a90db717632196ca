#!/usr/bin/env bash
# Gemma 3 270M (base, GGUF from `linearize fetch gemma3-270m`) converted and evaluated like SmolLM2 (#29): its global
# layers only (the default for a teacher with sliding-window layers) and all 18 layers, each against the teacher with
# both baselines (linear part off; the teacher cut to the same sinks + window).
#   bash benchmarks/gpu_gemma3_270m.sh GGUF DATA_ROOT OUT        # DATA_ROOT holds data/{wikitext-raw,llm-foundry-icl}
# Stage 1 text: GENERAL (default DATA_ROOT's Wikipedia + Gutenberg + C4), TOKENS1 tokens. Global-only trains on
# SEQ_GLOBAL-token sequences (default 2048, beyond the 512-token local window); all-layers on 512 (its local layers'
# teacher sees no further). VARIANTS="global all recipe" (any order; "recipe" runs recipes/gemma3-270m as shipped, its
# data paths replaced by GENERAL, and evaluates its finetuned export); CPU dry run: TOKENS1=2048 SEQ_GLOBAL=256 ...
# Several instances may share one OUT (and one GPU): COMPARE= for all but one (the first evaluation of the instance
# with COMPARE on also scores the teacher and the StreamingLLM baseline). RECIPE_SETS: more --set flags (dry runs).
# Eval: WikiText-103 valid (1024 / stride 512, MAX_TOKENS), PIQA / ARC-e / Winogrande (first MC_LIMIT), perplexity by
# position in 4k blocks, passkey 1k/2k/4k, MQAR. Writes OUT/<variant>/{eval.json,eval.txt,wall_s,export/}.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF="${1:?usage: gpu_gemma3_270m.sh GGUF DATA_ROOT OUT}"; ROOT="${2:?}"; OUT="${3:?}"
PY="${PYTHON:-python3}"
TT="$ROOT/data/train-text"
GENERAL="${GENERAL:-$TT/wikipedia-2018-new-articles,$TT/gutenberg-books,$TT/c4-demo}"
TOKENS1="${TOKENS1:-1000000}"
ICL="$ROOT/data/llm-foundry-icl"
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gemma.log"; }
COMPARE="${COMPARE-1}"
for v in ${VARIANTS:-global all}; do
  mkdir -p "$OUT/$v"
  t0=$(date +%s)
  case "$v" in
    global|all)
      if [ "$v" = global ]; then flags=(--layers global --seq-len "${SEQ_GLOBAL:-2048}")
      else flags=(--layers all --seq-len "${SEQ_ALL:-512}"); fi
      log "$v: convert ${flags[*]}"
      "$PY" -m linearize convert "$GGUF" --out "$OUT/$v/export" --overwrite --data "$GENERAL" --tokens "$TOKENS1" \
        --sinks 4 --window 256 --batch-size "${BS1:-8}" "${flags[@]}" > "$OUT/$v/convert.log" 2>&1
      export_dir="$OUT/$v/export" ;;
    recipe)
      log "recipe: recipes/gemma3-270m/finetune.yaml"
      "$PY" -m linearize finetune recipes/gemma3-270m/finetune.yaml --set model.source="$GGUF" \
        --set output="$OUT/recipe/run" --set overwrite=true --set "convert.data=[${GENERAL}]" \
        --set "finetune.data=[${GENERAL}]" ${RECIPE_SETS:-} > "$OUT/recipe/finetune.log" 2>&1
      export_dir="$OUT/recipe/run/finetuned" ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  echo $(( $(date +%s) - t0 )) > "$OUT/$v/wall_s"
  log "$v: done in $(cat "$OUT/$v/wall_s") s"
  extra=()
  if [ -n "$COMPARE" ]; then extra=(--compare "$GGUF"); COMPARE=""; fi
  t0=$(date +%s)
  "$PY" -m linearize eval "$export_dir" "${extra[@]}" --text "$ROOT/data/wikitext-raw/wiki.valid.raw" \
    --context 1024 --stride 512 --max-tokens "${MAX_TOKENS:-131072}" \
    --mc-files "$ICL/piqa.jsonl,$ICL/arc_easy.jsonl,$ICL/winogrande.jsonl" --limit "${MC_LIMIT:-500}" \
    --tasks "${TASKS:-ppl,mc,distance,passkey,mqar}" --passkey-contexts "${PASSKEY:-1024,2048,4096}" \
    --distance-context "${DIST_CONTEXT:-4096}" --distance-tokens "${DIST_TOKENS:-65536}" ${MQAR_PAIRS:+--mqar-pairs "$MQAR_PAIRS"} \
    --batch-size "${BATCH:-16}" --json-out "$OUT/$v/eval.json" --overwrite > "$OUT/$v/eval.txt" 2> "$OUT/$v/eval.log"
  log "$v: evaluated in $(( $(date +%s) - t0 )) s"
done
log done
