#!/usr/bin/env bash
# One H200 call for the quality numbers (issues: convert, finetune, kernels-in-a-model). Expects the SmolLM2 GGUF's
# two halves and the data staged as described in docs/benchmarks.md (/tmp/stage from a previous call + .carry/b).
#   bash benchmarks/sessions/gpu_session.sh  (on the device, repo root)   -> $OUT/model_check.log, $OUT/smollm2.log
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1  # /tmp/site: the carried wheels; linearize itself is installed:
python3 -m pip install -q --no-deps --no-build-isolation -e .
cat /tmp/stage/gguf.part00 .carry/b/gguf.part01 > /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
[ -n "${MODEL_CHECK:-}" ] && timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_model.py 2>&1 | tee "$OUT/model_check.log"
GGUF=/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf TRAIN=/tmp/stage/train WIKI=/tmp/stage/wiki.valid.raw \
  SETS="${SETS:---set convert.tokens=1000000 --set finetune.tokens=3000000}" \
  bash benchmarks/finetune_smollm2.sh /tmp/runs 2>&1 | tee "$OUT/smollm2.log"
cp /tmp/runs/results.json "$OUT/" 2>/dev/null
for v in /tmp/runs/*/; do n=$(basename "$v"); cp "$v"finetuned/finetune_report.json "$OUT/$n.finetune_report.json" 2>/dev/null; cp "$v"converted/transfer_report.json "$OUT/$n.transfer_report.json" 2>/dev/null; done
