#!/usr/bin/env bash
# The H200 session's background chain after 2026-12-01's fifth (benchmarks/sessions/gpu_session_scale.sh): what #12, #13 and
# #14 still need, in the order the GPU is free for it.
#   bash benchmarks/sessions/gpu_session_window.sh GGUF DATA_ROOT TOKENIZERS OUT
# 1. alone, needing no data (#14, 10.4k tokens/s of transfer against a goal of 20k): Llama-3-8B shapes through both
#    stages (benchmarks/gpu_7b_inprocess.py, seq 2048) with this version's transfer (records q/k/v and the
#    teacher's own attention output, bf16 flash target), then the same under PROFILE (kernel tables of 2 steps of each
#    stage); then the decode step's kernels at batch 1 / 64 / 4,096 (#13, benchmarks/diagnoses/gpu_decode_profile.py);
# 2. once GGUF.ready exists (the caller stages the GGUF in parts meanwhile), #12's window combinations as one
#    instance each sharing the GPU: W 512; W 256 + 3 softmax layers, then LoRA (instruction mix + KD 0.5, the
#    recipe's stage 2) from it; W 256 then the same LoRA; W 256 with seed 1 (this one also scores the teacher);
# 3. alone: `linearize bench sweep` of the W 256 export (linear rows, 4,096 new tokens) and of W 256 + 3 softmax
#    layers, then the teacher on static cache + torch.compile up to batch 1,024 (#13's >= 5x goal needs its best
#    batch; capped at 10 minutes).
# Progress: OUT/chain.log. Every poll call should run `bash benchmarks/sessions/gpu_collect.sh OUT "$OUT"`, so that results
# come back even if the machine is released before the chain ends.
set -uo pipefail
cd "$(dirname "$0")/../.."
GGUF="$1"; ROOT="$2"; TOK="$3"; OUT="$4"
mkdir -p "$OUT/ablation" "$OUT/7b" "$OUT/sweep" "$OUT/decode"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"

TOKENIZER="$TOK/stories260K-hf" python3 benchmarks/gpu_7b_inprocess.py llama-3-8b "$OUT/7b/llama-3-8b.json" 12 8 2048 \
  > "$OUT/7b/llama-3-8b.txt" 2>&1
log "7b rc=$?"
PROFILE="$OUT/7b" TOKENIZER="$TOK/stories260K-hf" \
  python3 benchmarks/gpu_7b_inprocess.py llama-3-8b "$OUT/7b/llama-3-8b-profiled.json" 6 6 2048 \
  > "$OUT/7b/llama-3-8b-profiled.txt" 2>&1
log "7b profile rc=$?"
python3 benchmarks/diagnoses/gpu_decode_profile.py "$OUT/decode/decode-profile.json" 1,64,4096 64 \
  > "$OUT/decode/decode-profile.txt" 2>&1
log "decode profile rc=$?"

while [ ! -f "$GGUF.ready" ]; do sleep 5; done
log "ablation: start"
A=(bash benchmarks/gpu_ablate_smollm2.sh "$GGUF" "$ROOT" "$OUT/ablation")
pids=()
for vs in "window512" "window256+softmax3 kd-instruct@window256+softmax3" "window256 kd-instruct@window256"; do
  COMPARE= VARIANTS="$vs" "${A[@]}" > "$OUT/ablation/s-${vs%% *}.txt" 2>&1 &
  pids+=($!)
done
VARIANTS="window256-seed1" "${A[@]}" > "$OUT/ablation/s-seed1.txt" 2>&1 &  # this one also scores the teacher
pids+=($!)
wait "${pids[@]}"
python3 benchmarks/ablation_table.py "$OUT/ablation" > "$OUT/ablation/table.md" 2>&1
log "ablation done"

for w in window256 window256+softmax3; do
  python3 -m linearize bench sweep "$OUT/ablation/$w/export" --compare "$GGUF" --memory-limit 80GB \
    --lengths 4096 --models linear --json "$OUT/sweep/sweep-$w.json" --plots "$OUT/sweep/$w" \
    > "$OUT/sweep/sweep-$w.txt" 2>&1
  log "sweep $w rc=$?"
done
timeout 600 python3 -m linearize bench sweep "$OUT/ablation/window256/export" --compare "$GGUF" --memory-limit 80GB \
  --lengths 4096 --models "teacher static+compile" --max-batch 1024 --json "$OUT/sweep/sweep-static.json" \
  > "$OUT/sweep/sweep-static.txt" 2>&1
log "sweep static rc=$?"
