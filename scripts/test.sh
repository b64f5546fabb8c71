#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test files run on parallel workers (pytest-xdist), each file whole on one worker so that its
# module-scoped servers start once. Most of the suite's time is server start-ups, CPU-bound
# imports, so on two cores this gains ~10 %. PAGODA_TEST_WORKERS=0 runs everything in this process.
WORKERS=${PAGODA_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}
[ "$WORKERS" -gt 4 ] && WORKERS=4  # more would mostly add memory: the heavy tests start ranks of their own
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile "$@"
