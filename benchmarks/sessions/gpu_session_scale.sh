#!/usr/bin/env bash
# One H200 session's background chain (#14, #12 item 4, #13): keeps the GPU busy while the caller polls.
#   bash benchmarks/sessions/gpu_session_scale.sh GGUF DATA_ROOT TOKENIZERS OUT
# 1. alone on the GPU, needing no data: Llama-3-8B and Llama-2-7B shapes through both stages at seq 2048
#    (benchmarks/gpu_7b_inprocess.py), with export and reload timed where a fast filesystem has room (/dev/shm or a
#    local disk that writes >= 300 MB/s); then benchmarks/gpu_chunked_loss.py;
# 2. once GGUF.ready exists (the caller stages the GGUF in parts meanwhile), the stage-1 knob ablation
#    (benchmarks/gpu_ablate_smollm2.sh) as one instance per variant sharing the GPU (their wall clocks are therefore
#    shared-GPU times);
# 3. `linearize bench sweep` on one of those exports against the real teacher, alone.
# Progress: OUT/chain.log. Everything lands under OUT, on the GPU machine: every poll call should also run
# `bash benchmarks/sessions/gpu_collect.sh OUT "$OUT"` so that results come back even if the machine is released before the
# chain ends (on 2026-12-01 a finished ablation was lost that way).
set -uo pipefail
cd "$(dirname "$0")/../.."
GGUF="$1"; ROOT="$2"; TOK="$3"; OUT="$4"
mkdir -p "$OUT/ablation" "$OUT/7b" "$OUT/sweep"
log() { echo "[$(date +%H:%M:%S)] $*" >> "$OUT/chain.log"; }
log "start"

# -- 1. 7-8B shapes ---------------------------------------------------------------------------------------------------
EXPORT_DIR=""
free_gb() { df -BG --output=avail "$1" 2>/dev/null | tail -1 | tr -dc 0-9; }
if [ "$(free_gb /dev/shm || echo 0)" -ge 40 ] 2>/dev/null; then
  EXPORT_DIR=/dev/shm/lin7b
else
  mb_s=$(dd if=/dev/zero of=/tmp/ddtest bs=1M count=1024 oflag=direct 2>&1 | grep -o '[0-9.]* [MG]B/s' || true)
  rm -f /tmp/ddtest
  log "/dev/shm has $(free_gb /dev/shm)G free; /tmp writes $mb_s"
  case "$mb_s" in *GB/s) EXPORT_DIR=/tmp/lin7b ;; *MB/s) [ "${mb_s%%.*}" -ge 300 ] 2>/dev/null && EXPORT_DIR=/tmp/lin7b ;; esac
  [ "$(free_gb /tmp || echo 0)" -ge 40 ] 2>/dev/null || EXPORT_DIR=""
fi
log "7b: export dir '${EXPORT_DIR:-none}'"
for shape in llama-3-8b llama-2-7b; do
  EXPORT_DIR="$EXPORT_DIR" TOKENIZER="$TOK/stories260K-hf" \
    python3 benchmarks/gpu_7b_inprocess.py "$shape" "$OUT/7b/$shape.json" 12 8 2048 > "$OUT/7b/$shape.txt" 2>&1
  log "7b: $shape rc=$?"
done
python3 benchmarks/gpu_chunked_loss.py "$OUT/7b/chunked-loss.json" > "$OUT/7b/chunked-loss.txt" 2>&1
log "chunked loss rc=$?"

# -- 2. the stage-1 knob ablation -------------------------------------------------------------------------------------
while [ ! -f "$GGUF.ready" ]; do sleep 5; done
log "ablation: start"
A=(bash benchmarks/gpu_ablate_smollm2.sh "$GGUF" "$ROOT" "$OUT/ablation")
pids=()
for v in loss-xent loss-both state-query proj32 window256; do
  COMPARE= VARIANTS="$v" "${A[@]}" > "$OUT/ablation/s-$v.txt" 2>&1 &
  pids+=($!)
done
VARIANTS="softmax3-recall" "${A[@]}" > "$OUT/ablation/s-softmax3-recall.txt" 2>&1 &  # also scores the teacher
pids+=($!)
wait "${pids[@]}"
python3 benchmarks/ablation_table.py "$OUT/ablation" > "$OUT/ablation/table.md" 2>&1
log "ablation done"

# -- 3. generation sweep ----------------------------------------------------------------------------------------------
EXPORT="$OUT/ablation/loss-xent/export"  # the default architecture: W64, 4 sinks
[ -f "$EXPORT/config.json" ] || EXPORT="$OUT/ablation/loss-both/export"
S=(python3 -m linearize bench sweep "$EXPORT" --compare "$GGUF" --memory-limit 80GB)
"${S[@]}" --lengths 1024,4096 --models teacher,linear --json "$OUT/sweep/sweep.json" --plots "$OUT/sweep" \
  > "$OUT/sweep/sweep.txt" 2>&1
log "sweep (teacher, linear) done rc=$?"
# the static-cache row compiles once per batch size: 4,096 new tokens only
"${S[@]}" --lengths 4096 --models "teacher static+compile" --json "$OUT/sweep/sweep-static.json" \
  > "$OUT/sweep/sweep-static.txt" 2>&1
log "sweep done rc=$?"
