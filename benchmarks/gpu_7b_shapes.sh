#!/usr/bin/env bash
# 7-8B scale on one GPU (#14): random weights with a real architecture's shapes (benchmarks/random_model.py), through
# both stages at seq 2048 as a user runs them, with times, tokens/s and peak memory from the pipelines' own reports.
#   bash benchmarks/gpu_7b_shapes.sh SHAPE TOKENIZER_FLAG TEXT OUT
#   e.g.  bash benchmarks/gpu_7b_shapes.sh llama-3-8b "--gpt2-tokenizer DIR" TEXT_DIR $OUT
# Stage 1: `linearize convert` (TOKENS1 tokens, batch 8 x 2048, delta export: the 7B base stays where it is).
# Stage 2: `linearize finetune recipes/SHAPE/finetune.yaml` from that export, LoRA + KD 0.5 (shared teacher),
#          TOKENS2 tokens, batch 8 = 4 micro-batches of 2 x 2048, full (merged) export.
# Then: reload times of both exports (from_pretrained, to the GPU) and their sizes -> OUT/SHAPE-summary.json.
# CPU dry run: SHAPE=tiny TOKENS1=16384 TOKENS2=16384 SEQ=128 DEVICE=cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE="${1:?usage: gpu_7b_shapes.sh SHAPE TOKENIZER_FLAG TEXT OUT}"; TOKFLAG="${2:?}"; TEXT="${3:?}"; OUT="${4:?}"
PY="${PYTHON:-python3}"; WORK="${WORK:-/tmp/shapes}/$SHAPE"; SEQ="${SEQ:-2048}"
TOKENS1="${TOKENS1:-655360}"; TOKENS2="${TOKENS2:-327680}"; DEVICE="${DEVICE:-cuda}"
RECIPE="recipes/$SHAPE/finetune.yaml"; [ -f "$RECIPE" ] || RECIPE=recipes/stories260k/finetune.yaml
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/$SHAPE.log"; }
if [ -z "${SKIP_BUILD:-}" ] || [ ! -f "$WORK/teacher/config.json" ]; then  # SKIP_BUILD=1: built beforehand
  log "building random $SHAPE"
  # shellcheck disable=SC2086
  "$PY" benchmarks/random_model.py "$SHAPE" "$WORK/teacher" $TOKFLAG --device "$DEVICE" | tail -1 > "$OUT/$SHAPE-build.json"
  log "built: $(cat "$OUT/$SHAPE-build.json")"
fi
t0=$(date +%s)
"$PY" -m linearize convert "$WORK/teacher" --out "$WORK/converted" --overwrite --data "$TEXT" --tokens "$TOKENS1" \
  --seq-len "$SEQ" --batch-size 8 --val-tokens $((4 * SEQ)) --export delta \
  > "$OUT/$SHAPE-convert.log" 2>&1
log "converted in $(( $(date +%s) - t0 )) s"
cp "$WORK/converted/transfer_report.json" "$OUT/$SHAPE-transfer_report.json"
t0=$(date +%s)
"$PY" -m linearize finetune "$RECIPE" --set model.source="$WORK/converted" --set output="$WORK/ft" \
  --set overwrite=true --set convert.data=null --set "finetune.data=$TEXT" --set finetune.seq_len="$SEQ" \
  --set finetune.tokens="$TOKENS2" --set finetune.batch_size=8 --set finetune.micro_batch_size=2 \
  --set "finetune.kd={weight: 0.5}" --set finetune.val_tokens=$((4 * SEQ)) --set finetune.checkpoint_every=0 \
  --set eval.text=null > "$OUT/$SHAPE-finetune.log" 2>&1
log "finetuned in $(( $(date +%s) - t0 )) s"
cp "$WORK/ft/finetuned/finetune_report.json" "$OUT/$SHAPE-finetune_report.json"
"$PY" - "$WORK" "$DEVICE" <<'PY' | tee "$OUT/$SHAPE-summary.json"
import json, sys, time
from pathlib import Path
import torch
import linearize  # noqa: F401  (registers the linearized classes)
from transformers import AutoModelForCausalLM
work, device = Path(sys.argv[1]), sys.argv[2]
out = {}
for name in ("converted", "ft/finetuned"):
    folder = work / name
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out[name] = {"reload_s": round(time.perf_counter() - t0, 1),
                 "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                 "parameters": sum(p.numel() for p in m.parameters())}
    del m
t = json.loads((work / "converted" / "transfer_report.json").read_text())
f = json.loads((work / "ft" / "finetuned" / "finetune_report.json").read_text())
cal = t["calibration"]
tokens1 = t["steps"] * 8 * cal["seq_len"]
out["transfer"] = {"tokens": tokens1, "seconds": round(t["transfer_seconds"], 1),
                   "tokens_per_s": round(tokens1 / max(t["transfer_seconds"], 1e-9)),
                   "peak_GiB": (t["peak_gpu_memory_bytes"] or 0) / 2**30, "total_s": round(t["total_seconds"], 1)}
out["finetune"] = {"tokens": f["tokens"], "seconds": round(f["train_seconds"], 1),
                   "tokens_per_s": round(f["tokens_per_second"]), "peak_GiB": (f["peak_gpu_memory_bytes"] or 0) / 2**30,
                   "total_s": round(f["total_seconds"], 1)}
print(json.dumps(out, indent=1))
PY
log "done"
