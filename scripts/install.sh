#!/usr/bin/env bash
# Install linearize with the extras given as $1 (default: gguf). Picks PyTorch's CPU build where no NVIDIA GPU is
# present (an unpinned `torch` would pull a multi-GB CUDA build); on a GPU machine the existing torch is kept.
# Where Python writes bytecode (PYTHONDONTWRITEBYTECODE unset), --no-compile: pip would byte-compile every installed
# module (all of torch's), while Python compiles only those it imports, once, on first use. Measured on 2 cores: torch
# + linearize[gguf] took 18 s of CPU instead of 48 s; the first import then costs 7 s more, the later ones nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-gguf}"
PY="${PYTHON:-python3}"
pip=("$PY" -m pip install -q)
[ -n "${PYTHONDONTWRITEBYTECODE:-}" ] || pip+=(--no-compile)
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.5"
  else
    "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[${extras}]"
