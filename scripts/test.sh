#!/usr/bin/env bash
# Install test dependencies and run the suite (CPU; Triton kernels run under TRITON_INTERPRET=1), one pytest-xdist
# worker per core (PYTEST_WORKERS=N to choose; 0 = in this process). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     # the fast lane: every package, a few minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec "${PYTHON:-python3}" -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
