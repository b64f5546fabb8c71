#!/usr/bin/env bash
# The wave-2 features on a GPU, in device calls of under 10 minutes each:
#   bash scripts/gpu_check_wave2.sh tests   # the gpu-marked tests of quantization, the fp8 KV cache,
#                                           # LoRA, vision models, long-prompt attention
#   bash scripts/gpu_check_wave2.sh bench   # W1 with fp8 weights / fp8 KV / both, AWQ decode and W1,
#                                           # LoRA W1, structured outputs, a 32k prompt's first token
#   bash scripts/gpu_check_wave2.sh kernels # the LoRA kernels by row count (LINEAR=1: every linear
#                                           # path too)
#   bash scripts/gpu_check_wave2.sh spec    # speculative verification steps, the draft's cost
#   bash scripts/gpu_check_wave2.sh lora    # W1 and batch-1 decode with adapters against none
#   bash scripts/gpu_check_wave2.sh vlm     # the Qwen2-VL-7B-shaped serving run beside transformers
#   bash scripts/gpu_check_wave2.sh moe     # the fused-MoE kernel per layer by batch size, W1 on the
#                                           # Qwen3-30B-A3B shape beside transformers (128 prompts)
#   bash scripts/gpu_check_wave2.sh logits  # each quantization method's logit error against bf16
#                                           # (the Qwen3-0.6B shape, weights at a trained scale)
# Packages the device image lacks travel as wheels in .whl/ (see docs/gpu.md); the shapes come
# from $PAGODA_SHARED_MODELS (default shared/models).
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pagoda-gpu}; mkdir -p "$OUT"
MODELS=${PAGODA_SHARED_MODELS:-shared/models}
python3 scripts/ceilings.py "$OUT/ceilings.txt"  # the floors' rates, measured in the same call

if [ "${1:-tests}" = tests ]; then
    timeout 500 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant_fp8.py tests/test_quant_compressed_tensors.py \
        tests/test_w4a16_kernel.py tests/test_quant_w4a16.py tests/test_kv_cache_fp8.py tests/test_lora_kernels.py \
        tests/test_lora.py tests/test_vlm.py tests/test_vlm_next.py tests/test_triton_attention.py tests/test_elementwise_kernels.py \
        tests/test_gpu_spec_decode.py tests/test_spec_eagle3.py tests/test_spec_bench.py tests/test_embed_bert.py \
        tests/test_executor_overlap.py tests/test_gpu.py 2>&1 | tee "$OUT/wave2_tests.log" \
        | grep -E "passed|failed|^FAILED|Error" | tail -15
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_moe.py -k fused_moe 2>&1 | tail -1
    exit 0
fi

if [ "${1:-tests}" = kernels ]; then
    [ -n "${LINEAR:-}" ] && timeout 150 python3 scripts/bench_linear_methods.py --rows 1 4 8 16 64 256 4096
    timeout 100 python3 scripts/bench_lora_kernels.py ${OLD_LORA_KERNELS:+--old "$OLD_LORA_KERNELS"}  # the file of an older commit
    exit 0
fi
if [ "${1:-tests}" = spec ]; then
    timeout 150 python3 scripts/bench_spec_decode.py --model "$MODELS/llama-3.1-8b" --step-times 2>&1 | grep -v INFO
    timeout 150 python3 scripts/bench_spec_decode.py --model "$MODELS/llama-3.1-8b" --draft-model llama-1b-shape \
        --alpha 0.7 --batch 1 8 64 --repeats 1 2>&1 | grep -v INFO
    exit 0
fi
if [ "${1:-tests}" = lora ]; then  # each run: the base model, then the adapters, on one engine
    LORA="--model $MODELS/llama-3.1-8b --load-format dummy --max-model-len 1024 --lora-rank 16"
    for run in "--num-prompts 256 --input-len 512 --output-len 256 --num-loras 8" \
               "--num-prompts 1 --input-len 128 --output-len 128 --num-loras 1"; do
        timeout 250 python3 -m pagoda.entrypoints.cli --log-level warning bench throughput --disable-tqdm \
            $LORA $run 2>&1 | tail -2
    done
    exit 0
fi
if [ "${1:-tests}" = moe ]; then
    timeout 150 python3 scripts/bench_fused_moe.py
    MOE="--model $MODELS/qwen3-30b-a3b --load-format dummy --input-len 512 --output-len 256 --max-model-len 1024"
    for backend in pagoda hf; do  # transformers on half of W1's prompts: one batch of 128
        prompts=256; [ $backend = hf ] && prompts=128
        timeout 210 python3 -m pagoda.entrypoints.cli --log-level warning bench throughput --disable-tqdm $MOE \
            --backend $backend --hf-max-batch-size 128 --num-prompts $prompts 2>&1 | tail -1
    done
    exit 0
fi
if [ "${1:-tests}" = logits ]; then
    timeout 300 python3 scripts/quant_logit_error.py --model "$MODELS/qwen3-0.6b" --random --group-size 128 2>&1 \
        | grep -v "INFO\|WARNING"
    exit 0
fi
if [ "${1:-tests}" = vlm ]; then
    timeout 500 python3 scripts/bench_vlm_gpu.py 2>&1 | grep -v INFO
    exit 0
fi

bench() {  # name, then bench arguments
    local name=$1; shift
    timeout 200 python3 -m pagoda.entrypoints.cli --log-level warning bench throughput --disable-tqdm \
        --output-json "$OUT/$name.json" "$@" 2>&1 | tail -1
}
W1="--model $MODELS/llama-3.1-8b --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 1024"
bench w1_bf16 $W1
bench w1_fp8 $W1 --quantization fp8 --kv-cache-dtype fp8
bench w1_fp8_weights $W1 --quantization fp8
bench w1_fp8_kv $W1 --kv-cache-dtype fp8
bench w1_lora8 $W1 --num-loras 8 --lora-rank 16
# Ray's wheel fits the carry limit without its Java jar: zip -d ray-*.whl 'ray/jars/*' (docs/gpu.md).
python3 -c "import ray" 2>/dev/null && bench w1_ray $W1 --distributed-executor-backend ray
# AWQ's config alone: --load-format dummy rounds the random weights to 4 bits as they load.
AWQ="/tmp/llama-3.1-8b-awq --load-format dummy"
python3 scripts/quantize_awq_rtn.py --model "$MODELS/llama-3.1-8b" --config-only --out /tmp/llama-3.1-8b-awq | tail -1
bench w1_awq --model $AWQ --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 1024
for batch in 1 16 64; do
    for model in "$MODELS/llama-3.1-8b --load-format dummy" "$AWQ"; do
        timeout 120 python3 -m pagoda.entrypoints.cli --log-level warning bench latency --model $model \
            --batch-size $batch --input-len 128 --output-len 128 --max-model-len 1024 2>&1 | tail -1
    done
done
timeout 200 python3 scripts/bench_structured_gpu.py --model "$MODELS/llama-3.1-8b" ${TOKENIZER:+--tokenizer "$TOKENIZER"} 2>&1 | grep -v INFO | tail -2
timeout 120 python3 -m pagoda.entrypoints.cli --log-level warning bench latency --model "$MODELS/llama-3.1-8b" \
    --load-format dummy --batch-size 1 --input-len 32000 --output-len 2 --max-model-len 33000 \
    --max-num-batched-tokens 32768 2>&1 | tail -1
