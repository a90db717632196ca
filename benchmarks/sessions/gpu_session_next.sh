#!/usr/bin/env bash
# An H200 session's background chain for #13 and #14 (written after 2026-12-02's first run; its decode, sweep and
# 7B proj_dim-64 parts ran later that day, docs/benchmarks.md), in the order the GPU is free for it.
#   bash benchmarks/sessions/gpu_session_next.sh TOKENIZERS OUT [PARTS]
# PARTS (default "decode,sweep,7b") picks and orders the parts below, so that one machine's 30 minutes can be split;
# "sinks" (not in the default) runs tests/gpu/test_gpu_sinks.py and benchmarks/gpu_sinks_fused.py.
# 1. needing no data (#13): the one-token feature maps, fused vs reference (benchmarks/diagnoses/gpu_onetoken_features.py);
#    the decode profile with the compiled step at batches 1, 4, 16, 64 (benchmarks/diagnoses/gpu_decode_profile.py --compile)
#    and at batch 4,096 (where the one-token feature-map layout of 2026-12-02 should show);
#    Llama-2-7B shapes through both stages with the 2026-12-02 transfer, default and proj_dim 64 (#14);
# 2. `linearize bench sweep` on SmolLM2's shapes with random weights (speed does not depend on the values, so no
#    GGUF or export needs staging): the teacher on static cache + torch.compile up to batch 1,024 against the linear
#    rows, compiled and not (#13's >= 5x goal and "never slower at the same batch"), 10 minutes at most.
# Progress: OUT/chain.log. The machine goes back after ~30 s without a call: issue the poll calls back to back
# (`sleep 150; cat OUT/chain.log; bash benchmarks/sessions/gpu_collect.sh OUT "$OUT"`), and think between them only briefly.
set -uo pipefail
cd "$(dirname "$0")/../.."
TOK="$1"; OUT="$2"; PARTS="${3:-decode,sweep,7b}"
mkdir -p "$OUT/decode" "$OUT/7b" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"
decode() {
  python3 benchmarks/diagnoses/gpu_onetoken_features.py "$OUT/decode/onetoken-features.json" > "$OUT/decode/onetoken-features.txt" 2>&1
  log "one-token features rc=$?"
  python3 benchmarks/diagnoses/gpu_decode_profile.py "$OUT/decode/decode-compiled.json" 1,4,16,64 64 --compile \
    > "$OUT/decode/decode-compiled.txt" 2>&1
  log "decode profile rc=$?"
  python3 benchmarks/diagnoses/gpu_decode_profile.py "$OUT/decode/decode-4096.json" 4096 64 \
    > "$OUT/decode/decode-4096.txt" 2>&1  # the batch where the one-token feature maps took 11.7 of 34.6 ms
  log "decode profile batch 4096 rc=$?"
}
seven() {
  for p in "" 64; do
    PROJ_DIM="$p" TOKENIZER="$TOK/stories260K-hf" python3 benchmarks/gpu_7b_inprocess.py llama-2-7b \
      "$OUT/7b/llama-2-7b${p:+-proj$p}.json" 12 6 2048 > "$OUT/7b/llama-2-7b${p:+-proj$p}.txt" 2>&1
    log "llama-2-7b proj=${p:-default} rc=$?"
  done
}
sweep() {
  timeout 600 python3 -m linearize bench sweep --memory-limit 80GB --lengths 4096 --max-batch 1024 \
    --models "teacher static+compile,linear,linear+compile" --json "$OUT/sweep/sweep-static.json" \
    > "$OUT/sweep/sweep-static.txt" 2>&1
  log "sweep static rc=$?"
}
sinks() {  # the fused sinks kernel: bf16 parity and time against the PyTorch form, before it goes on the chunk path
  python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_sinks.py > "$OUT/sinks-parity.txt" 2>&1
  log "sinks parity rc=$?"
  python3 benchmarks/gpu_sinks_fused.py "$OUT/sinks.json" > "$OUT/sinks.txt" 2>&1
  log "sinks timing rc=$?"
}
for part in ${PARTS//,/ }; do
  case "$part" in decode) decode ;; 7b) seven ;; sweep) sweep ;; sinks) sinks ;; *) log "unknown part $part" ;; esac
done
log "done"
