#!/usr/bin/env bash
# 2026-12-08 (sixteenth session): #27, whether 4,096-token copy probes (--recall-context 4096) keep the linear parts
# that the passkey at 4k needs when the window-only layers are chosen with a 64-pair global cache (against
# 2026-12-08's gc64+wo-both, chosen on 1,024-token probes: passkey 0.20 at 4k); meanwhile the GPU tests of the
# window-only decode step and of the models (#28: window-only layers keep no state); then the throughput sweep of the
# default layout without and with window-only layers (SWEEPS= skips it; TOKENIZER: e.g. stories260K-hf).
#   TOKENIZER=... bash benchmarks/sessions/gpu_session_recall_context.sh SMOLLM2_GGUF DATA_ROOT OUT
# Eval as gpu_session_window_only.sh (TASKS, MAX_TOKENS, DIST_TOKENS overridable); progress in OUT/chain.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
SMOL="$1"; ROOT="$2"; OUT="$3"
mkdir -p "$OUT/ablation"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"
( python3 -m pytest tests/gpu/test_gpu_window_decode.py tests/gpu/test_gpu_model.py -q -p no:cacheprovider \
    > "$OUT/gpu-tests.log" 2>&1; log "gpu tests rc=$?" ) &
export MAX_TOKENS="${MAX_TOKENS:-131072}" BATCH="${BATCH:-16}" TASKS="${TASKS:-ppl,distance,passkey,mqar}"
export DIST_TOKENS="${DIST_TOKENS:-32768}"
COMPARE="" GC_COMPARE="" VARIANTS="${VARIANTS:-gc64+wo-both4k}" bash benchmarks/gpu_ablate_smollm2.sh "$SMOL" "$ROOT" \
  "$OUT/ablation" > "$OUT/ablation/lane.log" 2>&1
log "lane rc=$?"
wait
python3 benchmarks/recall_table.py "$OUT/ablation" > "$OUT/ablation/recall_table.md" 2>&1
# then, alone on the GPU (#28): the default layout without and with the 13 window-only layers the default conversion
# chose on 2026-12-08 (random weights: a step's cost does not depend on them), 4k-token generations
for layout in nowo:"" wo13:"--window-only-layers 0-5,8-10,14,17,22,25"; do
  case " ${SWEEPS-nowo wo13} " in *" ${layout%%:*} "*) ;; *) continue ;; esac
  n=${layout%%:*}; mkdir -p "$OUT/sweep"
  python3 benchmarks/random_export.py "$OUT/sweep/$n/export" --tokenizer "${TOKENIZER:?a tokenizer folder}" \
    ${layout#*:} > "$OUT/sweep/$n-export.txt" 2>&1
  python3 -m linearize bench sweep "$OUT/sweep/$n/export" --lengths 4096 --models linear --max-batch 8192 \
    --json "$OUT/sweep/$n.json" --overwrite > "$OUT/sweep/$n.txt" 2>&1
  log "sweep $n rc=$?"
done
log "done"
