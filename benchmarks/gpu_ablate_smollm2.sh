#!/usr/bin/env bash
# H200 ablation behind docs/benchmarks.md's "Closing the gap beyond the window" table (#12): SmolLM2-135M-Instruct,
# each lever alone and combined at one fixed budget, every variant evaluated the same way.
#   bash benchmarks/gpu_ablate_smollm2.sh GGUF DATA_ROOT OUT          # DATA_ROOT holds data/{train-text,...}
# Stage 1 (attention transfer): TOKENS1 tokens of general English (Wikipedia + Gutenberg + C4, mixed evenly),
# seq_len 1024. Stage 2 (LoRA): TOKENS2 tokens, from the best stage-1 export, distilling the teacher on general text
# (KD weight 1) against the shipped recipe's instruction mix (next-token + KD 0.5). Eval: WikiText-103 valid
# perplexity (1024 / stride 512, whole file), PIQA / ARC-e / Winogrande (first MC_LIMIT items each), passkey.
# Override sizes for a CPU dry run: TOKENS1=4096 TOKENS2=4096 MC_LIMIT=8 PASSKEY=256 SEQ=128 ...
# Recall-aware layer choice: VARIANTS=softmax3-recall (sinks + 3 softmax layers scored by KL + copy-span KL).
# Stage-1 knobs (#12 item 4): VARIANTS="window128 window256 loss-both loss-xent state-query proj32 tokens5m tokens20m"
# (each with 4 sinks; stage 2 starts from BEST=<variant>). Window combinations: window512 window256+softmax3;
# window256-seed1 repeats window256 with --seed 1 (data order, sampling and the maps' initialisation);
# State forms and training for recall beyond the window (#27), each with 4 sinks and W 256:
#   VARIANTS="additive gated-delta delta wdrop25 gated-delta+wdrop25 seq2048 gated-delta+seq2048"
#   TASKS=ppl,mc,distance,passkey,mqar; and the softmax layers' selection score at W 256 (3 layers each):
#   VARIANTS="sm3-kl sm3-recall sm3-both"; the feature maps on q/k before RoPE: "unrotated gated-delta+unrotated". GENERAL=a,b overrides the stage-1 text (a list of files or folders).
# (linearize eval adds the linear-off and StreamingLLM rows when COMPARE is on; benchmarks/recall_table.py OUT
# tabulates them with perplexity by position, passkey and MQAR).
# What users run (#27 item 5): "default" is `linearize convert GGUF` with no flags at all (data-free: text sampled from
# the teacher), "default+budget25" the same with --state-budget 25%, "default+tokens1m" with 1M sampled tokens; "recipe" runs recipes/smollm2-135m as shipped
# (GENERAL / INSTRUCT replace its data paths) and evaluates its finetuned export; SPEC@NAME evaluates NAME's export with
# SPEC set on a copy of its config.json: gc64@NAME a global cache of 64 pairs (training-free), nowo@NAME every linear
# layer's linear part on, gc64+nowo@NAME both (with_settings). Window-only layers (#27): "wo" is the default
# conversion with --auto-window-only, "gc64+wo" with --global-cache 64 too (trained and chosen with the cache),
# "gc64+wo-both" the same chosen by KL + copy-span KL, "gc64+wo-both4k" with 4,096-token copy probes
# (--recall-context 4096: the span copied from ~3,970 tokens back). RECIPE_SETS: more --set flags (dry runs).
# kd-instruct@NAME / kd-general@NAME run stage 2 from variant NAME's export into the folder NAME+kd-instruct. Several instances may share one OUT (and one GPU):
#   COMPARE= VARIANTS="loss-xent proj32" bash benchmarks/gpu_ablate_smollm2.sh GGUF ROOT OUT &   (and so on)
# ablation_table.py OUT then tabulates every variant folder.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF="${1:?usage: gpu_ablate_smollm2.sh GGUF DATA_ROOT OUT}"; ROOT="${2:?}"; OUT="${3:?}"
PY="${PYTHON:-python3}"
TT="$ROOT/data/train-text"
GENERAL="${GENERAL:-$TT/wikipedia-2018-new-articles,$TT/gutenberg-books,$TT/c4-demo}"
INSTRUCT="${INSTRUCT:-$TT/alpaca-cleaned,$TT/oasst1-en,$TT/lima,$TT/gsm8k-train}"
TOKENS1="${TOKENS1:-1000000}"; TOKENS2="${TOKENS2:-4000000}"; SEQ="${SEQ:-1024}"; BS1="${BS1:-8}"
ICL="$ROOT/data/llm-foundry-icl"
EVAL=(--text "$ROOT/data/wikitext-raw/wiki.valid.raw" --context "${CONTEXT:-1024}" --stride "${STRIDE:-512}"
      ${MAX_TOKENS:+--max-tokens "$MAX_TOKENS"}
      --mc-files "$ICL/piqa.jsonl,$ICL/arc_easy.jsonl,$ICL/winogrande.jsonl" --limit "${MC_LIMIT:-500}"
      --passkey-contexts "${PASSKEY:-1024,2048,4096}" --distance-context "${DIST_CONTEXT:-4096}"
      --distance-tokens "${DIST_TOKENS:-65536}" ${MQAR_PAIRS:+--mqar-pairs "$MQAR_PAIRS"} --tasks "${TASKS:-ppl,mc,passkey}" --batch-size "${BATCH:-32}")
VARIANTS="${VARIANTS:-base sinks softmax3 sinks+softmax3 kd-general kd-instruct}"
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/ablation.log"; }

evaluate() {  # NAME EXPORT [extra eval flags]
  local name=$1 export=$2; shift 2
  "$PY" -m linearize eval "$export" "${EVAL[@]}" "$@" --json-out "$OUT/$name/eval.json" > "$OUT/$name/eval.txt" 2>&1
}

convert_plain() {  # NAME [convert flags]: the conversion exactly as a user types it (no data or size flags)
  local name=$1; shift
  mkdir -p "$OUT/$name"
  log "$name: convert $*"
  local t0=$(date +%s)
  "$PY" -m linearize convert "$GGUF" --out "$OUT/$name/export" --overwrite "$@" > "$OUT/$name/convert.log" 2>&1
  echo $(( $(date +%s) - t0 )) > "$OUT/$name/wall_s"
  log "$name: converted in $(cat "$OUT/$name/wall_s") s; evaluating"
  evaluate "$name" "$OUT/$name/export" ${COMPARE:+--compare "$GGUF"}
  COMPARE=""
  log "$name: $(grep -m1 -i 'perplexity' "$OUT/$name/eval.txt" || true)"
}

convert_variant() {  # NAME [convert flags]: stage 1 on GENERAL at the ablation's sizes
  local name=$1; shift
  convert_plain "$name" --data "$GENERAL" --tokens "$TOKENS1" --seq-len "$SEQ" --batch-size "$BS1" "$@"
}

with_settings() {  # FROM SPEC: FROM's export with SPEC set in a copy of its config.json (weights linked), evaluated
  # as FROM+SPEC. SPEC joins with "+": gcK = global_cache K; nowo = window_only_layers emptied (every linear layer's
  # linear part on again: the same transfer before auto_window_only's choice). With GC_COMPARE set, the first row
  # that sets a global cache also scores the teacher and StreamingLLM at the window + K (equal exact keys).
  local from=$1 spec=$2 name="$1+$2" cmp=""
  mkdir -p "$OUT/$name/export"
  for f in "$OUT/$from/export"/*; do ln -sf "$(readlink -f "$f")" "$OUT/$name/export/"; done
  rm "$OUT/$name/export/config.json"
  "$PY" - "$OUT/$from/export/config.json" "$OUT/$name/export/config.json" "$spec" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
lin = cfg["linearize"]
for token in sys.argv[3].split("+"):
    if token.startswith("gc"):
        lin["global_cache"] = int(token[2:])
    elif token == "nowo":
        lin["window_only_layers"] = []
    else:
        sys.exit(f"unknown setting {token!r} (gcK or nowo)")
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PYEOF
  case "+$spec+" in *+gc*) if [ -n "${GC_COMPARE:-}" ]; then cmp=1; GC_COMPARE=""; fi ;; esac
  log "$name: evaluating${cmp:+ with the teacher and StreamingLLM at W + K}"
  evaluate "$name" "$OUT/$name/export" ${cmp:+--compare "$GGUF"}
  log "$name: $(grep -m1 -i 'perplexity' "$OUT/$name/eval.txt" || true)"
}

recipe_variant() {  # the shipped recipe, data paths replaced by GENERAL / INSTRUCT
  mkdir -p "$OUT/recipe"
  log "recipe: recipes/smollm2-135m/finetune.yaml"
  local t0=$(date +%s)
  "$PY" -m linearize finetune recipes/smollm2-135m/finetune.yaml --set model.source="$GGUF" \
    --set output="$OUT/recipe/run" --set overwrite=true --set "convert.data=[${GENERAL}]" \
    --set "finetune.data=[${INSTRUCT}]" ${RECIPE_SETS:-} > "$OUT/recipe/finetune.log" 2>&1
  echo $(( $(date +%s) - t0 )) > "$OUT/recipe/wall_s"
  log "recipe: done in $(cat "$OUT/recipe/wall_s") s; evaluating"
  evaluate recipe "$OUT/recipe/run/finetuned" ${COMPARE:+--compare "$GGUF"}
  COMPARE=""
  log "recipe: $(grep -m1 -i 'perplexity' "$OUT/recipe/eval.txt" || true)"
}

finetune_variant() {  # NAME FROM_EXPORT DATA KD_WEIGHT
  local name=$1 from=$2 data=$3 kd=$4
  mkdir -p "$OUT/$name"
  log "$name: LoRA on $data, kd weight $kd, from $from"
  local t0=$(date +%s)
  "$PY" -m linearize finetune recipes/smollm2-135m/finetune.yaml --set model.source="$from" \
    --set output="$OUT/$name/run" --set overwrite=true --set "finetune.data=[${data}]" \
    --set finetune.tokens="$TOKENS2" --set finetune.seq_len="$SEQ" --set finetune.kd.weight="$kd" \
    --set finetune.checkpoint_every=1000 --set convert.data=null ${FT_SETS:-} > "$OUT/$name/finetune.log" 2>&1
  echo $(( $(date +%s) - t0 )) > "$OUT/$name/wall_s"
  log "$name: finetuned in $(cat "$OUT/$name/wall_s") s; evaluating"
  evaluate "$name" "$OUT/$name/run/finetuned"
  log "$name: $(grep -m1 -i 'perplexity' "$OUT/$name/eval.txt" || true)"
}

COMPARE="${COMPARE-1}"  # the first evaluation also scores the teacher (COMPARE= for the other parallel runs)
BEST="${BEST:-sinks+softmax3}"
for v in $VARIANTS; do
  case "$v" in
    base) convert_variant base ;;
    sinks) convert_variant sinks --sinks 4 ;;
    softmax3) convert_variant softmax3 --auto-softmax-layers 3 ;;
    sinks+softmax3) convert_variant sinks+softmax3 --sinks 4 --auto-softmax-layers 3 ;;
    softmax3-recall) convert_variant softmax3-recall --sinks 4 --auto-softmax-layers 3 --selection-score both ;;
    window128) convert_variant window128 --sinks 4 --window 128 ;;
    window256) convert_variant window256 --sinks 4 --window 256 ;;
    window512) convert_variant window512 --sinks 4 --window 512 ;;
    window256+softmax3) convert_variant window256+softmax3 --sinks 4 --window 256 --auto-softmax-layers 3 ;;
    window256-seed1) convert_variant window256-seed1 --sinks 4 --window 256 --seed 1 ;;
    loss-both) convert_variant loss-both --sinks 4 --loss both ;;
    loss-xent) convert_variant loss-xent --sinks 4 --loss xent ;;
    state-query) convert_variant state-query --sinks 4 --state-per query ;;
    proj32) convert_variant proj32 --sinks 4 --proj-dim 32 ;;
    tokens5m) convert_variant tokens5m --sinks 4 --tokens 5000000 ;;
    tokens20m) convert_variant tokens20m --sinks 4 --tokens 20000000 ;;
    additive) convert_variant additive --sinks 4 --window 256 ;;
    gated-delta) convert_variant gated-delta --sinks 4 --window 256 --state-update gated-delta ;;
    delta) convert_variant delta --sinks 4 --window 256 --state-update delta ;;
    wdrop25) convert_variant wdrop25 --sinks 4 --window 256 --window-dropout 0.25 ;;
    gated-delta+wdrop25) convert_variant gated-delta+wdrop25 --sinks 4 --window 256 --state-update gated-delta \
      --window-dropout 0.25 ;;
    seq2048) convert_variant seq2048 --sinks 4 --window 256 --seq-len 2048 ;;
    gated-delta+seq2048) convert_variant gated-delta+seq2048 --sinks 4 --window 256 --state-update gated-delta \
      --seq-len 2048 ;;
    unrotated) convert_variant unrotated --sinks 4 --window 256 --feature-input unrotated ;;
    gated-delta+unrotated) convert_variant gated-delta+unrotated --sinks 4 --window 256 --state-update gated-delta \
      --feature-input unrotated ;;
    sm3-kl|sm3-recall|sm3-both) convert_variant "$v" --sinks 4 --window 256 --auto-softmax-layers 3 \
      --selection-score "${v#sm3-}" ;;
    default) convert_plain default ;;
    default+budget25) convert_plain default+budget25 --state-budget 25% ;;
    default+tokens1m) convert_plain default+tokens1m --tokens 1000000 ;;
    recipe) recipe_variant ;;
    kd-general) finetune_variant kd-general "$OUT/$BEST/export" "$GENERAL" 1.0 ;;
    kd-instruct) finetune_variant kd-instruct "$OUT/$BEST/export" "$INSTRUCT" 0.5 ;;
    kd-general@*) finetune_variant "${v#*@}+kd-general" "$OUT/${v#*@}/export" "$GENERAL" 1.0 ;;
    kd-instruct@*) finetune_variant "${v#*@}+kd-instruct" "$OUT/${v#*@}/export" "$INSTRUCT" 0.5 ;;
    wo) convert_plain wo --auto-window-only ;;
    gc64+wo) convert_plain gc64+wo --global-cache 64 --auto-window-only ;;
    gc64+wo-both) convert_plain gc64+wo-both --global-cache 64 --auto-window-only --selection-score both ;;
    gc64+wo-both4k) convert_plain gc64+wo-both4k --global-cache 64 --auto-window-only --selection-score both \
                      --recall-context 4096 ;;
    *@*) with_settings "${v#*@}" "${v%@*}" ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
done
"$PY" benchmarks/ablation_table.py "$OUT" | tee "$OUT/table.md"
log "done"
