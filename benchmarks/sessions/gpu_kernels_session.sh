#!/usr/bin/env bash
# One H200 call for the kernel issue: CUDA tests, parity (+ launch sweep), a converted model on the kernels, and the
# benchmarks. Part 1 = tests + tests/gpu (parity, model check) + sweep + `linearize bench generate`; part 2 = `linearize bench
# kernels` grid with fla (fla-core wheel carried in .whl); part 3 = the feature-map bench. Logs go to $OUT as they come.
#   bash benchmarks/sessions/gpu_kernels_session.sh 1   (on the device, repo root; carry .whl)
#   bash benchmarks/sessions/gpu_kernels_session.sh 2
#   bash benchmarks/sessions/gpu_kernels_session.sh 3
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1  # /tmp/site: the carried wheels; linearize itself is installed:
python3 -m pip install -q --no-deps --no-build-isolation -e .
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "${1:-1}" = 1 ]; then
  echo "== pytest on CUDA"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/models/test_parity.py \
    -k "triton or bf16 or ring or beam or padding or decode" 2>&1 | tail -15 | tee "$OUT/pytest.log"
  echo "== parity, model on the kernels (tests/gpu)"
  timeout 270 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/parity.log"
  echo "== launch sweep"
  timeout 170 python3 benchmarks/gpu_kernel_sweep.py --sweep 2>&1 | tee "$OUT/sweep.log"
  echo "== bench generate"
  timeout 140 python3 -m linearize.cli.main bench generate --batch 1,32 --prompt 2048,8192 --new-tokens 24 \
    --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"
elif [ "$1" = 2 ]; then
  echo "== bench kernels (fla: $(python3 -c 'import fla; print(fla.__version__)' 2>&1 | tail -1))"
  timeout 330 python3 benchmarks/gpu_kernel_sweep.py --bench "$OUT/bench.json" --max-seconds 320 \
    --seq-lens 1024,4096,8192,16384,65536 2>&1 | tee "$OUT/bench.log"
else
  echo "== bench feature maps"
  timeout 200 python3 -c "from linearize.bench.feature_maps import run_feature_map_bench as r; r(json_path='$OUT/fm.json')" \
    2>&1 | tee "$OUT/fm.log"
fi
