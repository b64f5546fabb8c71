#!/usr/bin/env bash
# The GPU checks, in one device call: GPU tests, then W1 and W2 (../shared/BENCHMARKS.md) with
# transformers on W1's requests. Run from the repository root on a machine with a CUDA GPU:
#   bash scripts/gpu_check.sh          # ~6 min on an H100
#   bash scripts/gpu_check.sh quick    # no transformers, no one-step-at-a-time W1 (~4 min)
#   bash scripts/gpu_check.sh w2-peer  # W2, Pagoda and transformers only (~5 min: transformers
#                                      # takes ~4 of them), for W2's ratio in a call of its own
#   bash scripts/gpu_check.sh long     # a new prompt's first token at 1k-131k tokens, beside
#                                      # transformers (scripts/bench_prefill_lengths.py, ~4 min)
#   bash scripts/gpu_check.sh serve    # W3: `pagoda serve` at rates inf and 32 against offline on
#                                      # the same requests, and the cold start (~3 min)
# Packages the device image lacks travel as wheels in .whl/ (see docs/gpu.md).
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagoda-gpu}; mkdir -p "$OUT"
MODELS=${PAGODA_SHARED_MODELS:-shared/models}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

MODE=${1:-full}
python3 scripts/ceilings.py "$OUT/ceilings.txt"  # the floors' rates, measured in the same call
case "$MODE" in
    long) exec python3 scripts/bench_prefill_lengths.py --model "$MODELS/llama-3.1-8b" --iters 1 ;;
    serve) OUT=$OUT exec bash scripts/bench_serve_w3.sh inf 32 ;;
esac
# -s shows each greedy divergence from transformers with its logit gap (tests/test_gpu.py).
[ "$MODE" != w2-peer ] && python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu*.py tests/test_triton_attention.py \
    tests/test_elementwise_kernels.py tests/test_sampling_kernel.py tests/test_fp8_gemm.py tests/test_kv_cache_fp8.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "diverged|passed|failed|Error" | tail -15

bench() {  # name, then bench arguments
    local name=$1; shift
    timeout 400 python3 -m pagoda.entrypoints.cli --log-level warning bench throughput --disable-tqdm \
        --output-json "$OUT/$name.json" "$@" 2>&1 | tail -3
}
W1="--model $MODELS/llama-3.1-8b --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 1024"
W2="--model $MODELS/qwen3-0.6b --load-format dummy --num-prompts 256 --input-len 562 --output-len 562 --random-range-ratio 0.822 --max-model-len 2048"
bench w2_pagoda $W2
if [ "$MODE" = w2-peer ]; then
    bench w2_hf $W2 --backend hf --hf-max-batch-size 128
else
    bench w1_pagoda $W1
fi
if [ "$MODE" = full ]; then
    bench w1_pagoda_sync $W1 --no-async-scheduling  # one step at a time: what the overlap is worth
    bench w1_hf $W1 --backend hf --hf-max-batch-size 128
fi
# Batch-1 decode latency of the 8B shape, ms per output token, beside transformers'.
LAT="--model $MODELS/llama-3.1-8b --load-format dummy --batch-size 1 --input-len 128 --output-len 128 --max-model-len 1024"
for backend in pagoda hf; do
    [ "$MODE" = w2-peer ] || [ "$MODE-$backend" = quick-hf ] && continue
    timeout 300 python3 -m pagoda.entrypoints.cli --log-level warning bench latency $LAT --backend $backend \
        --output-json "$OUT/latency_$backend.lat" 2>&1 | tail -1
done
# With two GPUs or more: W1 at TP=2 beside the TP=1 run above (DP=2 needs `pagoda serve`: not here).
if [ "$MODE" != w2-peer ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    bench w1_pagoda_tp2 $W1 --tensor-parallel-size 2
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print(f"{'run':<14} {'wall s':>8} {'out tok/s':>10} {'total tok/s':>12}")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem:<14} {r['elapsed_s']:>8.2f} {r['output_tokens_per_second']:>10.0f} {r['tokens_per_second']:>12.0f}")
print(f"{'run':<16} {'decode ms/token':>16} {'first token ms':>15}")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.lat")):
    r = json.loads(f.read_text())
    print(f"{f.stem:<16} {r['decode_ms_per_token']:>16.2f} {r['first_token_s'] * 1e3:>15.1f}")
PY
