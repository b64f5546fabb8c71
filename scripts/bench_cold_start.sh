#!/usr/bin/env bash
# Issue 18's cold start: `pagoda serve` on the Llama-3.1-8B shape (random weights), process start to
# the first `/health` 200, START_COUNT times (default 3) after one start that fills Triton's and
# Pagoda's caches, each start's phases from its log. TREES alternates the starts between source
# trees (e.g. a `git archive` of an older commit), each run with that tree first on PYTHONPATH:
#   PAGODA_SHARED_MODELS=.shared_models bash scripts/bench_cold_start.sh
#   TREES=". /tmp/base" bash scripts/bench_cold_start.sh
# SERVE_ARGS replaces the model and its flags (a CPU check: a tiny model's directory and --tokenizer).
# The packages' bytecode is compiled first where it is missing, as a pip install leaves it (the
# device image ships none: without it each start compiles torch's and transformers' sources).
set -uo pipefail
OUT=${OUT:-/tmp/pagoda-gpu}; mkdir -p "$OUT"
MODELS=$(realpath -m "${PAGODA_SHARED_MODELS:-shared/models}")
ROOT=$PWD
SITE=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
python3 -m compileall -q -j 0 "$SITE" ${TREES:-.} >/dev/null 2>&1
TOKENIZER=$(mktemp -d)  # the shapes carry none: the tests' byte-level one
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} python3 -c "import sys; from pathlib import Path; \
from tests.serving import save_tokenizer; save_tokenizer(Path(sys.argv[1]))" "$TOKENIZER"
SERVE_ARGS=${SERVE_ARGS:-"$MODELS/llama-3.1-8b --tokenizer $TOKENIZER --load-format dummy --max-model-len 1024"}
start() {  # tree, label
    local log="$OUT/cold_start_$2.log" started server
    started=$(date +%s%N)
    (cd "$1" && PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} \
        exec python3 -m pagoda.entrypoints.cli serve $SERVE_ARGS --port 8012) > "$log" 2>&1 &
    server=$!
    until curl -sf -o /dev/null localhost:8012/health; do
        kill -0 $server 2>/dev/null || { echo "$2: the server exited"; tail -5 "$log"; return; }
        sleep 0.05
    done
    echo "$2 ($1): process start -> /health 200 in $(( ($(date +%s%N) - started) / 1000000 )) ms;" \
        "$(grep -o 'start-up: ready in .*' "$log")"
    kill -TERM $server; wait $server
}
start "$ROOT" first
for i in $(seq "${START_COUNT:-3}"); do
    for tree in ${TREES:-.}; do start "$(realpath "$tree")" "$i-$(basename "$(realpath "$tree")")"; done
done
