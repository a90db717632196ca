#!/usr/bin/env bash
# The next H200 session's background chain (after 2026-12-01's, benchmarks/gpu_session_scale.sh): what #12, #13 and
# #14 still need, in the order the GPU is free for it.
#   bash benchmarks/gpu_session_window.sh GGUF DATA_ROOT TOKENIZERS OUT
# 1. alone, needing no data: where Llama-3-8B's transfer step spends its time (#14: 10.4k tokens/s against a goal
#    of 20k), a profile of 2 steps of each stage (PROFILE=OUT/7b, benchmarks/gpu_7b_inprocess.py);
# 2. once GGUF.ready exists (the caller stages the GGUF in parts meanwhile), #12's window combinations as one
#    instance each sharing the GPU: W 512; W 256 + 3 softmax layers, then LoRA (instruction mix + KD 0.5, the
#    recipe's stage 2) from it; W 256 then the same LoRA; W 64 with 4 sinks (today's default, for the sweep);
# 3. alone: `linearize bench sweep` of the W 64 and W 256 exports (linear rows; with the split decode kernel, the
#    default since 2026-12-01), then the teacher on static cache + torch.compile up to batch 1,024 (#13's >= 5x goal
#    against it needs its best batch).
# Progress: OUT/chain.log. Every poll call should run `bash benchmarks/gpu_collect.sh OUT "$OUT"`, so that results
# come back even if the machine is released before the chain ends.
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF="$1"; ROOT="$2"; TOK="$3"; OUT="$4"
mkdir -p "$OUT/ablation" "$OUT/7b" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"

PROFILE="$OUT/7b" TOKENIZER="$TOK/stories260K-hf" \
  python3 benchmarks/gpu_7b_inprocess.py llama-3-8b "$OUT/7b/llama-3-8b-profiled.json" 6 6 2048 \
  > "$OUT/7b/llama-3-8b-profiled.txt" 2>&1
log "7b profile rc=$?"

while [ ! -f "$GGUF.ready" ]; do sleep 5; done
log "ablation: start"
A=(bash benchmarks/gpu_ablate_smollm2.sh "$GGUF" "$ROOT" "$OUT/ablation")
pids=()
for vs in "window512" "window256+softmax3 kd-instruct@window256+softmax3" "window256 kd-instruct@window256"; do
  COMPARE= VARIANTS="$vs" "${A[@]}" > "$OUT/ablation/s-${vs%% *}.txt" 2>&1 &
  pids+=($!)
done
VARIANTS="sinks" "${A[@]}" > "$OUT/ablation/s-sinks.txt" 2>&1 &  # this one also scores the teacher
pids+=($!)
wait "${pids[@]}"
python3 benchmarks/ablation_table.py "$OUT/ablation" > "$OUT/ablation/table.md" 2>&1
log "ablation done"

for w in sinks window256; do
  python3 -m linearize bench sweep "$OUT/ablation/$w/export" --compare "$GGUF" --memory-limit 80GB \
    --lengths 4096 --models linear --json "$OUT/sweep/sweep-$w.json" --plots "$OUT/sweep/$w" \
    > "$OUT/sweep/sweep-$w.txt" 2>&1
  log "sweep $w rc=$?"
done
timeout 900 python3 -m linearize bench sweep "$OUT/ablation/sinks/export" --compare "$GGUF" --memory-limit 80GB \
  --lengths 4096 --models "teacher static+compile" --max-batch 1024 --json "$OUT/sweep/sweep-static.json" \
  > "$OUT/sweep/sweep-static.txt" 2>&1
log "sweep static rc=$?"
