#!/usr/bin/env bash
# One H200 session's background chain (2026-12-01, #12 item 4, #14, #13): keeps the GPU busy while the caller polls.
#   bash benchmarks/gpu_session_scale.sh GGUF DATA_ROOT TOKENIZERS OUT
# 1. the stage-1 knob ablation (benchmarks/gpu_ablate_smollm2.sh) as 4 instances sharing the GPU (their wall clocks
#    are therefore shared-GPU times);
# 2. Llama-3-8B and Llama-2-7B shapes through both stages at seq 2048 (benchmarks/gpu_7b_inprocess.py), alone;
# 3. `linearize bench sweep` on a default-architecture export (W64, 4 sinks) against the real teacher, alone.
# Progress: OUT/chain.log. Everything lands under OUT, on the GPU machine: every poll call should also run
# `bash benchmarks/gpu_collect.sh OUT "$OUT"` so that results come back even if the machine is released before the
# chain ends (on 2026-12-01 a finished ablation was lost that way).
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF="$1"; ROOT="$2"; TOK="$3"; OUT="$4"
mkdir -p "$OUT/ablation" "$OUT/7b" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"
A=(bash benchmarks/gpu_ablate_smollm2.sh "$GGUF" "$ROOT" "$OUT/ablation")
COMPARE= VARIANTS="tokens5m" "${A[@]}" > "$OUT/ablation/s1.txt" 2>&1 &
p1=$!
COMPARE= VARIANTS="loss-xent proj32" "${A[@]}" > "$OUT/ablation/s2.txt" 2>&1 &
p2=$!
COMPARE= VARIANTS="loss-both state-query" "${A[@]}" > "$OUT/ablation/s3.txt" 2>&1 &
p3=$!
VARIANTS="window128 window256 softmax3-recall" "${A[@]}"  # this one also scores the teacher > "$OUT/ablation/s4.txt" 2>&1 &
p4=$!
wait $p1 $p2 $p3 $p4
python3 benchmarks/ablation_table.py "$OUT/ablation" > "$OUT/ablation/table.md" 2>&1
log "ablation done"
# 7-8B in one process: the machine's disk wrote ~20 MB/s on 2026-12-01, too slow for 16 GB exports
python3 benchmarks/gpu_7b_inprocess.py llama-3-8b "$OUT/7b/llama-3-8b.json" 12 8 2048 > "$OUT/7b/llama-3-8b.txt" 2>&1
python3 benchmarks/gpu_7b_inprocess.py llama-2-7b "$OUT/7b/llama-2-7b.json" 12 8 2048 > "$OUT/7b/llama-2-7b.txt" 2>&1
log "7b done"
S=(python3 -m linearize bench sweep "$OUT/ablation/tokens5m/export" --compare "$GGUF" --memory-limit 80GB)
"${S[@]}" --lengths 1024,4096 --models teacher,linear --json "$OUT/sweep/sweep.json" --plots "$OUT/sweep" \
  > "$OUT/sweep/sweep.txt" 2>&1
log "sweep (teacher, linear) done"
# the static-cache row compiles once per batch size: 4,096 new tokens only
"${S[@]}" --lengths 4096 --models "teacher static+compile" --json "$OUT/sweep/sweep-static.json" \
  > "$OUT/sweep/sweep-static.txt" 2>&1
log "sweep done"
