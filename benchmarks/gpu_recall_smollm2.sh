#!/usr/bin/env bash
# Recall beyond the window (#27): one conversion of SmolLM2-135M-Instruct, then the same export evaluated with a sparse
# global cache of K pairs per layer and kv head (training-free: only config.json's global_cache differs), against
# the teacher and the two honest baselines (the model with its linear part off; the teacher cut to the same sinks +
# window = StreamingLLM at equal memory).
#   bash benchmarks/gpu_recall_smollm2.sh GGUF WIKI_RAW OUT           # WIKI_RAW: wikitext-raw/wiki.valid.raw
# Knobs: KS="0 16 64" (budgets), EXPORT=DIR (evaluate an existing export instead of converting), CONVERT="flags"
# (extra convert flags), PASSKEY=1024,2048,4096, MAX_TOKENS=131072 (perplexity tokens), BATCH=16.
# Writes OUT/<variant>/eval.json per variant and OUT/table.md (benchmarks/recall_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF="${1:?usage: gpu_recall_smollm2.sh GGUF WIKI_RAW OUT}"; WIKI="${2:?}"; OUT="${3:?}"
PY="${PYTHON:-python3}"
KS="${KS:-0 64}"
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/recall.log"; }

export_dir="${EXPORT:-$OUT/export}"
if [ -z "${EXPORT:-}" ]; then
  log "convert ${CONVERT:-(defaults)}"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m linearize convert "$GGUF" --out "$export_dir" --overwrite ${CONVERT:-} > "$OUT/convert.log" 2>&1
  echo $(( $(date +%s) - t0 )) > "$OUT/convert_wall_s"
  log "converted in $(cat "$OUT/convert_wall_s") s"
fi

first=1
for K in $KS; do
  name="global$K"
  mkdir -p "$OUT/$name"
  variant="$OUT/$name/export"
  "$PY" - "$export_dir" "$variant" "$K" <<'PYEOF'
import json, os, sys
from pathlib import Path
src, dst, k = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():  # every file shared by link, except the config that carries the setting
    if f.name != "config.json" and not (dst / f.name).exists():
        os.symlink(f, dst / f.name)
cfg = json.loads((src / "config.json").read_text())
cfg["linearize"]["global_cache"] = k
(dst / "config.json").write_text(json.dumps(cfg, indent=2))
PYEOF
  extra=(--baselines none)
  if [ "$first" = 1 ]; then extra=(--compare "$GGUF"); first=0; fi  # teacher and both baselines once
  log "$name: eval ${extra[*]}"
  t0=$(date +%s)
  "$PY" -m linearize eval "$variant" "${extra[@]}" --text "$WIKI" --context 1024 --stride 512 \
    --max-tokens "${MAX_TOKENS:-131072}" --tasks ppl,distance,passkey,mqar \
    --passkey-contexts "${PASSKEY:-1024,2048,4096}" --batch-size "${BATCH:-16}" \
    --json-out "$OUT/$name/eval.json" --overwrite > "$OUT/$name/eval.txt" 2> "$OUT/$name/eval.log"
  log "$name: evaluated in $(( $(date +%s) - t0 )) s"
done
"$PY" benchmarks/recall_table.py "$OUT" | tee "$OUT/table.md"
