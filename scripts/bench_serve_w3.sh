#!/usr/bin/env bash
# W3 (../shared/BENCHMARKS.md): offline `pagoda bench throughput` on 512 requests of 512 -> 256
# tokens (what the server's throughput is held against), then `pagoda serve` on the Llama-3.1-8B
# shape (random weights) and `pagoda bench serve` with the same request shape at each rate given
# (default: inf 32), failures printed with their status and body. Run on a CUDA machine from the
# repository root:
#   PAGODA_SHARED_MODELS=.shared_models bash scripts/bench_serve_w3.sh [RATE ...]
# SERVE_FLAGS adds engine flags to both runs, e.g. the prefill budget's trade:
#   SERVE_FLAGS="--max-num-batched-tokens 4096" bash scripts/bench_serve_w3.sh inf
# SERVER_FLAGS adds flags to `pagoda serve` alone (offline keeps its defaults), e.g. the server's
# step budget against offline's own:
#   SERVER_FLAGS="--max-num-batched-tokens 4096" bash scripts/bench_serve_w3.sh inf 32
# TRACE=DIR times the served runs (scripts/serve_trace: the core's steps, the front end's handling
# of each, the client's runs) and prints where they lost time against the core, at the end.
# The shared model configs carry no tokenizer: the byte-level one of the tests serves (prompts are
# token ids, drawn from what it gives for bench serve's pool text).
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SERVED_PYTHONPATH=$PYTHONPATH
if [ -n "${TRACE:-}" ]; then
    mkdir -p "$TRACE"; SERVED_PYTHONPATH=scripts/serve_trace:$PYTHONPATH
fi
OUT=${OUT:-/tmp/pagoda-gpu}; mkdir -p "$OUT"
MODELS=${PAGODA_SHARED_MODELS:-shared/models}
RATES=${*:-inf 32}
python3 -m pagoda.entrypoints.cli --log-level warning bench throughput --model "$MODELS/llama-3.1-8b" --load-format dummy \
    --num-prompts 512 --input-len 512 --output-len 256 --max-model-len 1024 --disable-tqdm ${SERVE_FLAGS:-} 2>&1 | tail -1
TOKENIZER=$(mktemp -d)
python3 -c "import sys; from pathlib import Path; from tests.serving import save_tokenizer; save_tokenizer(Path(sys.argv[1]))" "$TOKENIZER"
PORT=8011
started=$(date +%s%N)
PAGODA_STEP_TRACE=${TRACE:-} PYTHONPATH=$SERVED_PYTHONPATH python3 -m pagoda.entrypoints.cli serve "$MODELS/llama-3.1-8b" --tokenizer "$TOKENIZER" --load-format dummy \
    --max-model-len 1024 --port $PORT --disable-log-requests ${SERVE_FLAGS:-} ${SERVER_FLAGS:-} > "$OUT/w3_server.log" 2>&1 &
server=$!
until curl -sf -o /dev/null "localhost:$PORT/health"; do
    kill -0 $server 2>/dev/null || { echo "the server exited:"; tail -5 "$OUT/w3_server.log"; exit 1; }
    sleep 0.2
done
echo "process start -> /health 200: $(( ($(date +%s%N) - started) / 1000000 )) ms"
for rate in $RATES; do
    echo "== request rate $rate"
    PAGODA_STEP_TRACE=${TRACE:-} PYTHONPATH=$SERVED_PYTHONPATH python3 -m pagoda.entrypoints.cli --log-level warning bench serve --base-url "http://127.0.0.1:$PORT" \
        --num-prompts 512 --random-input-len 512 --random-output-len 256 --request-rate "$rate" \
        --output-json "$OUT/w3_rate_$rate.json" 2>&1 | grep -E "request [0-9]+ failed|completed|failed|errors|output_throughput|median_ttft|p99_ttft|median_tpot|p99_itl"
done
kill -TERM $server; wait $server; echo "server exit status $?"
grep -E "ERROR|Traceback" "$OUT/w3_server.log" | head -5
if [ -n "${TRACE:-}" ]; then python3 scripts/serve_trace/report.py "$TRACE"; fi
