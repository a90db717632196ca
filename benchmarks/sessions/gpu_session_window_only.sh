#!/usr/bin/env bash
# 2026-12-07 (fifteenth session): #27's window-only layers and global cache on the default conversion, and #28's sweep
# of the layouts users get. SmolLM2 lanes sharing one GPU (benchmarks/gpu_ablate_smollm2.sh; each lane its own log;
# convert times are shared-GPU times), all data-free conversions as users run them:
#   lane 1: "wo" (`linearize convert GGUF --auto-window-only`; + the teacher and StreamingLLM), then its export with
#           a 64-pair global cache and every linear part on (= the default conversion + global cache 64; + the
#           teacher and StreamingLLM at W + 64);
#   lane 2 (unless NO_LANE2=1): once wo's export exists: its export with every linear part on (= the default conversion) and with the
#           global cache set on the window-only choice;
#   lane 3: "gc64+wo" (--global-cache 64 --auto-window-only: trained and chosen with the cache), then its export with
#           every linear part on (= trained with the cache);
#   lane 4 (with LANE4=1): "gc64+wo-both" (the same, chosen by KL + copy-span KL);
#   meanwhile the GPU tests of the global cache's decode step and of the models.
# Then, alone on the GPU, `linearize bench sweep` (linear rows, 4k and 32k generations) on untrained exports
# (`--tokens 0`: the weights do not change a step's cost): the default layout (W 256 + 4 sinks, every layer linear),
# the recipe's (softmax layers 0, 1, 2) and the default with a 64-pair global cache, after the global cache's decode
# step alone (Triton against PyTorch and against the step without it: benchmarks/gpu_global_decode.py).
#   bash benchmarks/sessions/gpu_session_window_only.sh SMOLLM2_GGUF DATA_ROOT OUT
# DATA_ROOT: data/{wikitext-raw/wiki.valid.raw,llm-foundry-icl/*.jsonl}. Progress: OUT/chain.log; poll with
# benchmarks/sessions/gpu_collect.sh OUT DEST. LANE1 / LANE3 replace those lanes' variants (LANE1_COMPARE= drops
# lane 1's teacher and StreamingLLM rows), SWEEPS the swept layouts (empty: none); DECODE_FIRST=1 times the decode
# step before the lanes instead of after, NO_DECODE=1 skips it; NO_TESTS=1 skips the GPU tests.
set -uo pipefail
cd "$(dirname "$0")/../.."
SMOL="$1"; ROOT="$2"; OUT="$3"
mkdir -p "$OUT/ablation" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start; transformers $(python3 -c 'import transformers; print(transformers.__version__)')"
export MAX_TOKENS="${MAX_TOKENS:-131072}" BATCH="${BATCH:-16}" TASKS="${TASKS:-ppl,distance,passkey,mqar}"
export DIST_TOKENS="${DIST_TOKENS:-32768}"
ablate() {  # LANE COMPARE GC_COMPARE VARIANTS
  ( COMPARE="$2" GC_COMPARE="$3" VARIANTS="$4" bash benchmarks/gpu_ablate_smollm2.sh "$SMOL" "$ROOT" "$OUT/ablation" \
      > "$OUT/ablation/lane-$1.log" 2>&1
    log "lane $1 ($4) rc=$?" )
}
decode_step() {
  log "global-cache decode step"
  python3 benchmarks/gpu_global_decode.py "$OUT/global-decode.json" --max-seconds "${DECODE_SECONDS:-90}" \
    > "$OUT/global-decode.txt" 2>&1
  log "global-cache decode step rc=$?"
}
[ -n "${DECODE_FIRST:-}" ] && decode_step  # alone on the GPU before the lanes (a short budget: it comes back first)
[ -z "${NO_TESTS:-}" ] && ( python3 -m pytest tests/gpu/test_gpu_global_decode.py tests/gpu/test_gpu_model.py \
    tests/gpu/test_gpu_state_forms.py -q -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1; log "gpu tests rc=$?" ) &
ablate 1 "${LANE1_COMPARE-1}" "${LANE1_COMPARE-1}" "${LANE1:-wo gc64+nowo@wo}" &
[ -z "${NO_LANE2:-}" ] && ( while [ ! -f "$OUT/ablation/wo/wall_s" ]; do sleep 5; done
                            ablate 2 "" "" "nowo@wo gc64@wo" ) &
ablate 3 "" "" "${LANE3:-gc64+wo nowo@gc64+wo}" &
[ -n "${LANE4:-}" ] && ablate 4 "" "" "gc64+wo-both" &
for layout in default:"" recipe:"--softmax-layers 0,1,2" gc64:"--global-cache 64"; do  # untrained, for the sweeps
  case " ${SWEEPS-default recipe gc64} " in *" ${layout%%:*} "*) ;; *) continue ;; esac
  python3 -m linearize convert "$SMOL" --tokens 0 --out "$OUT/sweep/${layout%%:*}/export" --overwrite ${layout#*:} \
    > "$OUT/sweep/${layout%%:*}-convert.log" 2>&1
  log "sweep export ${layout%%:*} rc=$?"
done
wait
python3 benchmarks/recall_table.py "$OUT/ablation" > "$OUT/ablation/recall_table.md" 2>&1
[ -z "${DECODE_FIRST:-}${NO_DECODE:-}" ] && decode_step
for m in ${SWEEPS-default recipe gc64}; do
  log "sweep $m"
  python3 -m linearize bench sweep "$OUT/sweep/$m/export" --lengths "${SWEEP_LENGTHS:-4096,32768}" --models linear \
    --max-batch "${SWEEP_MAX_BATCH:-16384}" --json "$OUT/sweep/$m.json" --plots "$OUT/sweep/$m" --overwrite \
    > "$OUT/sweep/$m.txt" 2>&1
  log "sweep $m rc=$?"
done
log "done"
