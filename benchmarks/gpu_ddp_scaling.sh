#!/usr/bin/env bash
# #15: both stages on 1 and on N GPUs of one host (torchrun = DDP through accelerate), same recipe and global batch:
# tokens/s and peak memory per GPU from the pipelines' reports, scaling efficiency, and the largest difference
# between the two runs' trained weights.
#   bash benchmarks/gpu_ddp_scaling.sh RECIPE OUT [N] [--set k=v ...]
#   e.g. bash benchmarks/gpu_ddp_scaling.sh recipes/smollm2-135m/finetune.yaml $OUT 2 --set model.source=SMOL.gguf
# CPU dry run (gloo): bash benchmarks/gpu_ddp_scaling.sh recipes/stories260k/finetune.yaml /tmp/ddp 2 \
#   --set model.device=cpu --set convert.tokens=8192 --set finetune.tokens=16384
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE="${1:?usage: gpu_ddp_scaling.sh RECIPE OUT [N] [--set k=v ...]}"; OUT="${2:?}"; N="${3:-2}"; shift 3 || shift $#
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
for n in 1 "$N"; do
  "$PY" -m torch.distributed.run --nproc_per_node "$n" -m linearize.finetune "$RECIPE" --no-merge \
    --set output="$OUT/gpus$n" --set overwrite=true "$@" > "$OUT/gpus$n.log" 2>&1
done
"$PY" - "$OUT" "$N" <<'PY' | tee "$OUT/scaling.md"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out, n = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for k in (1, n):
    run = out / f"gpus{k}"
    t = json.loads((run / "converted" / "transfer_report.json").read_text())
    f = json.loads((run / "finetuned" / "finetune_report.json").read_text())
    tokens1 = t.get("tokens") or t["steps"] * t["calibration"]["train_sequences"] // max(t["steps"], 1)
    rows[k] = {"transfer tok/s": tokens1 / max(t["transfer_seconds"], 1e-9), "transfer peak GiB": (t["peak_gpu_memory_bytes"] or 0) / 2**30,
               "LoRA tok/s": f["tokens_per_second"], "LoRA peak GiB": (f["peak_gpu_memory_bytes"] or 0) / 2**30,
               "processes": f["processes"]}
print("| GPUs | transfer tok/s | transfer peak GiB (main) | LoRA tok/s | LoRA peak GiB (main) |")
print("|---|---|---|---|---|")
for k, r in rows.items():
    print(f"| {k} | {r['transfer tok/s']:,.0f} | {r['transfer peak GiB']:.1f} | {r['LoRA tok/s']:,.0f} | {r['LoRA peak GiB']:.1f} |")
for what in ("transfer tok/s", "LoRA tok/s"):
    print(f"{what}: {rows[n][what] / rows[1][what]:.2f}x on {n} GPUs, efficiency {rows[n][what] / rows[1][what] / n:.0%}")
diff = 0.0
for rel in ("converted/model.safetensors", "finetuned/adapter/adapter_model.safetensors"):
    a, b = (load_file(str(out / f"gpus{k}" / rel)) for k in (1, n))
    keys = [key for key in a if "linear_attn" in key or "lora" in key]
    diff = max([diff] + [float((a[key].float() - b[key].float()).abs().max()) for key in keys])
print(f"largest |difference| between the 1- and {n}-GPU trained weights: {diff:.2e}")
PY
