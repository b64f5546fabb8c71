"""LLaVA-NeXT (any-resolution tiles, unpadding, image_newline) through LLM: greedy tokens equal
transformers' for images of different sizes and aspect ratios in one batch; and batched image
encoding: a step's images go through the vision tower in one call, outputs unchanged; and
scripts/bench_vlm_gpu.py end to end at its tiny CPU scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from pagoda import LLM, SamplingParams
from tests.serving import python_path
from tests.tiny_vlm import (
    QWEN_IMAGE, hf_greedy_with_images, hf_qwen2_vl_greedy, random_image, save_tiny_llava, save_tiny_qwen2_vl,
)

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("vlm_next"), next_=True)


def _runner(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor.worker.runner


def _count_calls(module) -> list[int]:
    """A counter of `module`'s forward calls."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _requests(prompts_images: list[tuple[str, list]]) -> list[dict]:
    return [{"prompt": p, "multi_modal_data": {"image": images}} for p, images in prompts_images]


def test_llava_next_batch_matches_transformers(llava_next):
    # Wide (two tiles side by side), tall (two stacked), large (a 2x2 grid) and tiny images: each
    # gets its own grid, unpadding and placeholder count.
    wide, tall, large, tiny = (random_image(100, 40, 1), random_image(40, 90, 2), random_image(120, 110, 3),
                               random_image(20, 20, 4))
    cases = [("<image> wide then <image> tall", [wide, tall]), ("large <image>!", [large]),
             ("text only", []), ("<image>tiny", [tiny])]
    llm = LLM(str(llava_next), device="cpu", dtype="float32", max_model_len=512)
    try:
        outputs = llm.generate(_requests(cases), GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == [
        hf_greedy_with_images(llava_next, prompt, images, MAX_TOKENS) for prompt, images in cases
    ]
    # Placeholders as transformers' processor counts them: the 100x40 and 40x90 images differ.
    processor = transformers.AutoProcessor.from_pretrained(llava_next)
    expected = processor(text=cases[0][0], images=cases[0][1], return_tensors="pt")["input_ids"][0].tolist()
    assert outputs[0].prompt_token_ids == expected


def test_llava_next_chunked_prefill_matches_transformers(llava_next):
    images = [random_image(90, 50, 5), random_image(50, 100, 6)]
    prompt = "a <image> b <image> c"
    llm = LLM(str(llava_next), device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    try:
        tokens = llm.generate(_requests([(prompt, images)]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert _runner(llm).encoder_cache.num_encoded == 2
    finally:
        llm.shutdown()
    assert tokens == hf_greedy_with_images(llava_next, prompt, images, MAX_TOKENS)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_a_steps_images_go_through_the_tower_in_one_call(tmp_path, arch):
    if arch.startswith("qwen"):  # one packed sequence (Qwen2.5-VL: windows within each image)
        path, greedy, mark = save_tiny_qwen2_vl(tmp_path, arch), hf_qwen2_vl_greedy, QWEN_IMAGE
    else:
        path, greedy, mark = save_tiny_llava(tmp_path, next_=arch == "llava_next"), hf_greedy_with_images, "<image>"
    cases = [(f"one {mark} and {mark}", [random_image(60, 90, 7), random_image(100, 50, 8)]),
             (f"{mark} two", [random_image(70, 70, 9)]), ("no image", []),
             (f"three {mark}", [random_image(40, 30, 10)])]
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=512)
    try:
        model = _runner(llm).model
        calls = _count_calls(model.visual.model if arch.startswith("qwen") else model.vision_tower.model)
        outputs = llm.generate(_requests(cases), GREEDY, use_tqdm=False)
        # All four images are in the first step's prompt chunks: one call encodes them all.
        assert calls[0] == 1
        assert _runner(llm).encoder_cache.num_encoded == 4
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == [greedy(path, p, images, MAX_TOKENS) for p, images in cases]


def test_bench_vlm_gpu_runs_tiny_on_the_cpu():
    # scripts/bench_vlm_gpu.py measures issue 24's workload on the device; --tiny checks it end to end here.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **python_path(root)}
    done = subprocess.run([sys.executable, "scripts/bench_vlm_gpu.py", "--tiny"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{\n"):])
    # The six requests' prompts fit one step: their six images go through the tower together.
    assert (result["pagoda"]["encoder_calls"], result["pagoda"]["images_per_encoder_call"]) == (1, 6)
    assert result["transformers"]["output_tok_s"] > 0 and result["speedup"] > 0


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_vl"])
def test_a_quantized_language_model_counts_its_projections_quantized(tmp_path, kind):
    # The GPU layout check sizes a VLM with the checkpoint's quantization (it raised a TypeError
    # before every VLM took the argument): fp8 stores the language model's projection weights at
    # one byte, so the estimate drops by one byte per such weight, the vision tower unchanged.
    import torch

    from pagoda.config.resolve import model_spec
    from pagoda.parallel_config import estimate_weight_bytes
    from pagoda.quantization.fp8 import Fp8Config

    path = save_tiny_qwen2_vl(tmp_path) if kind == "qwen2_vl" else save_tiny_llava(tmp_path, next_=kind == "llava_next")
    spec = model_spec(transformers.AutoConfig.from_pretrained(path))
    text = spec.hf_config["text_config"]
    layers, hidden, inter = text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    projections = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter)
    bf16 = estimate_weight_bytes(spec, torch.bfloat16)
    assert estimate_weight_bytes(spec, torch.bfloat16, Fp8Config.from_config({})) == bf16 - projections
