#!/usr/bin/env bash
# Install linearize with the extras given as $1 (default: gguf). Picks PyTorch's CPU build where no NVIDIA GPU is
# present (an unpinned `torch` would pull a multi-GB CUDA build); on a GPU machine the existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-gguf}"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.5"
  else
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -q -e ".[${extras}]"
