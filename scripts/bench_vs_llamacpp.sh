#!/usr/bin/env bash
# `pagoda serve` against llama.cpp's own `llama-server` on the default model's GGUF, both with
# THREADS threads (default 2), alternating rounds (default 3), each server alone on the machine:
# 16 random 12-token prompts -> 64 tokens all at once, then one stream of 128 tokens; then a table
# of output tok/s, median TPOT and each server's resident memory after its runs (its whole
# process tree). Build llama-server first (docs/benchmarks.md has the recipe). From the repository
# root:
#   LLAMA_SERVER=/work/tools/llama.cpp/build/bin/llama-server bash scripts/bench_vs_llamacpp.sh [ROUNDS]
# PAGODA_FLAGS adds `pagoda serve` flags (e.g. "--max-model-len 1024"); OUT keeps the logs and JSON.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ROUNDS=${1:-3}
THREADS=${THREADS:-2}
LLAMA_SERVER=${LLAMA_SERVER:-/work/tools/llama.cpp/build/bin/llama-server}
OUT=${OUT:-$(mktemp -d /tmp/bench-vs-llamacpp.XXXX)}
PORT=${PORT:-8773}
GGUF=$(python3 -c "from pagoda.loader.default_model import default_gguf_path; print(default_gguf_path())") || exit 1
[ -x "$LLAMA_SERVER" ] || { echo "no llama-server at $LLAMA_SERVER (set LLAMA_SERVER; docs/benchmarks.md builds it)"; exit 1; }
mkdir -p "$OUT"
echo "GGUF $GGUF; $THREADS threads; $ROUNDS rounds; logs and JSON in $OUT"

start_server() {  # $1: llama.cpp or pagoda; sets $server
    if [ "$1" = llama.cpp ]; then
        "$LLAMA_SERVER" -m "$GGUF" --threads "$THREADS" --parallel 16 --cont-batching --ctx-size 16384 \
            --host 127.0.0.1 --port "$PORT" > "$OUT/$1.log" 2>&1 &
    else
        # The engine core's intra-op threads follow OMP_NUM_THREADS (default: every core).
        OMP_NUM_THREADS=$THREADS python3 -m pagoda.entrypoints.cli serve --host 127.0.0.1 --port "$PORT" \
            --disable-log-requests ${PAGODA_FLAGS:-} > "$OUT/$1.log" 2>&1 &
    fi
    server=$!
    until curl -sf -o /dev/null "127.0.0.1:$PORT/health"; do
        kill -0 $server 2>/dev/null || { echo "$1 exited:"; tail -5 "$OUT/$1.log"; exit 1; }
        sleep 0.5
    done
}

tree_rss_mb() {  # resident memory of $1 and its descendants
    local pids=$1 next=$1
    while next=$(for p in $next; do pgrep -P "$p"; done) && [ -n "$next" ]; do pids="$pids $next"; done
    ps -o rss= -p "$(echo $pids | tr ' ' ,)" | awk '{s += $1} END {printf "%d", s / 1024}'
}

bench() {  # $1: server name, $2: round, $3: label, then bench flags
    local name=$1 round=$2 label=$3; shift 3
    python3 -m pagoda.entrypoints.cli --log-level warning bench serve --base-url "http://127.0.0.1:$PORT" \
        --random-input-len 12 --request-rate inf --seed "$round" "$@" \
        --output-json "$OUT/${name}_${label}_$round.json" > "$OUT/${name}_${label}_$round.txt" 2>&1 \
        || { echo "bench $label against $name failed:"; tail -5 "$OUT/${name}_${label}_$round.txt"; }
}

for round in $(seq 1 "$ROUNDS"); do
    for name in llama.cpp pagoda; do
        start_server $name
        bench $name "$round" warmup --num-prompts 2 --random-output-len 8
        bench $name "$round" 16streams --num-prompts 16 --random-output-len 64
        bench $name "$round" 1stream --num-prompts 1 --random-output-len 128
        echo "$(tree_rss_mb $server)" > "$OUT/${name}_rss_$round.txt"
        kill -TERM $server; wait $server 2>/dev/null
        echo "round $round: $name done"
    done
done

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), range(1, int(sys.argv[2]) + 1)

def field(name, label, key):
    values = []
    for r in rounds:
        path = out / f"{name}_{label}_{r}.json"
        values.append(json.loads(path.read_text()).get(key) if path.exists() else None)
    return values

def fmt(values):
    return " / ".join("-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in values)

def ratio(p, l):
    pairs = [a / b for a, b in zip(p, l) if a and b]
    if not pairs:
        return "-"
    return f"{pairs[0]:.2f}" if len(pairs) == 1 else f"{min(pairs):.2f}-{max(pairs):.2f}"

print(f"\n| (rounds {', '.join(map(str, rounds))}) | llama-server | pagoda serve | ratio |\n|---|---|---|---|")
for label, title in (("16streams", "16 streams"), ("1stream", "one stream")):
    tps = [field(n, label, "output_throughput") for n in ("llama.cpp", "pagoda")]
    print(f"| {title}, output tok/s | {fmt(tps[0])} | {fmt(tps[1])} | {ratio(tps[1], tps[0])} |")
    tpot = [field(n, label, "median_tpot_ms") for n in ("llama.cpp", "pagoda")]
    print(f"| {title}, TPOT p50 ms | {fmt(tpot[0])} | {fmt(tpot[1])} | |")
rss = [[float((out / f"{n}_rss_{r}.txt").read_text()) for r in rounds] for n in ("llama.cpp", "pagoda")]
print(f"| resident MB after the runs | {fmt(rss[0])} | {fmt(rss[1])} | {ratio(rss[1], rss[0])} |")
EOF
