#!/usr/bin/env bash
# Pack the small result files of a GPU run (logs, JSON, tables, plots; no weights) into one tarball under DEST (the
# device call's $OUT), so that each poll call brings back everything finished so far.
#   bash benchmarks/sessions/gpu_collect.sh RUN_DIR DEST
set -uo pipefail
RUN="${1:?usage: gpu_collect.sh RUN_DIR DEST}"; DEST="${2:?}"
mkdir -p "$DEST"
( cd "$RUN" && find . -type f \( \( \( -name '*.json' -o -name '*.txt' -o -name '*.log' -o -name '*.md' -o -name '*.png' \
    -o -name 'wall_s' \) -not -path '*/export/*' -not -path '*/run/*' \) -o -path '*/export/config.json' -o -path '*/export/transfer_report.json' \) -size -4M -print0 \
  | tar czf "$DEST/results.tgz" --null -T - ) && ls -la "$DEST/results.tgz"
