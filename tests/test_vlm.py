"""Vision-language models (LLaVA, Qwen2-VL) through LLM: greedy tokens equal transformers' for
prompts with one and two images, in a batch with text-only prompts, through chunked prefill (each
image encoded once) and preemption, and from LLM.chat; the prefix cache keys image blocks by the image's content;
bad image inputs are refused with errors that name them."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.tiny_vlm import (
    PARTS_TEMPLATE, QWEN_IMAGE, hf_greedy_with_images, hf_qwen2_vl_greedy, random_image, save_tiny_llava,
    save_tiny_qwen2_vl,
)

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def llm(llava):
    engine = LLM(str(llava), device="cpu", dtype="float32", max_model_len=256, block_size=4,
                 limit_mm_per_prompt={"image": 2})
    yield engine
    engine.shutdown()


def _generate(llm: LLM, prompt: str, images: list) -> list[int]:
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, GREEDY, use_tqdm=False)
    return out[0].outputs[0].token_ids


def test_one_image_matches_transformers(llava, llm):
    image = random_image(40, 30, seed=1)
    prompt = "<image>What is this?"
    assert _generate(llm, prompt, [image]) == hf_greedy_with_images(llava, prompt, [image], MAX_TOKENS)


def test_two_images_of_different_sizes_match_transformers(llava, llm):
    images = [random_image(64, 48, seed=2), random_image(30, 90, seed=3)]
    prompt = "first <image> then <image> compare"
    tokens = _generate(llm, prompt, images)
    assert tokens == hf_greedy_with_images(llava, prompt, images, MAX_TOKENS)
    # The images matter: swapped, they give other tokens.
    assert tokens != _generate(llm, prompt, images[::-1])


def test_batch_mixes_image_and_text_prompts(llava, llm):
    a, b = random_image(50, 50, seed=4), random_image(70, 35, seed=5)
    prompts = [
        {"prompt": "<image>one", "multi_modal_data": {"image": a}},
        "plain text only",
        {"prompt": "two <image>", "multi_modal_data": {"image": [b]}},
        {"prompt": "more text"},
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [
        hf_greedy_with_images(llava, "<image>one", [a], MAX_TOKENS),
        hf_greedy_with_images(llava, "plain text only", [], MAX_TOKENS),
        hf_greedy_with_images(llava, "two <image>", [b], MAX_TOKENS),
        hf_greedy_with_images(llava, "more text", [], MAX_TOKENS),
    ]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert len(outputs[0].prompt_token_ids) == 16 + 3  # the image's 16 placeholders, "one"


def test_chunked_prefill_encodes_each_image_once(llava):
    # 8 tokens a step: each image's 16 placeholders span three chunks.
    engine = LLM(str(llava), device="cpu", dtype="float32", max_model_len=256, max_num_batched_tokens=8,
                 enable_prefix_caching=False)
    try:
        images = [random_image(45, 60, seed=6), random_image(60, 45, seed=7)]
        prompt = "a <image> b <image> c"
        assert _generate(engine, prompt, images) == hf_greedy_with_images(llava, prompt, images, MAX_TOKENS)
        runner = engine.llm_engine.engine_core.engine_core.executor.worker.runner
        assert runner.encoder_cache.num_encoded == 2
    finally:
        engine.shutdown()


def test_prefix_cache_keys_image_blocks_by_content(llm):
    prefix = "a shared text prefix that fills blocks "
    prompt = prefix + "<image> and after"
    image = random_image(48, 48, seed=8)

    def cached(img) -> tuple[int, list[int]]:
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    first_cached, first_tokens = cached(image)
    again_cached, again_tokens = cached(image.copy())
    assert again_cached > first_cached + 16 and again_tokens == first_tokens  # past the image's blocks
    changed = image.copy()
    changed.putpixel((47, 47), (0, 0, 0) if changed.getpixel((47, 47)) != (0, 0, 0) else (255, 255, 255))
    changed_cached, _ = cached(changed)
    # The text before the image still hits; no block holding a placeholder does.
    num_prefix = len(llm.get_tokenizer().encode(prefix))
    assert changed_cached <= num_prefix + 1 < again_cached


def test_chat_with_image_parts_equals_generate(llm):
    image = random_image(33, 44, seed=9)
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image}, {"type": "text", "text": "describe"},
    ]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    template = "<|im_start|>user\n<image>\ndescribe<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.get_tokenizer().encode(template, add_special_tokens=False)
    direct = llm.generate(
        {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False
    )[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


@pytest.mark.parametrize(("content_format", "user"), [
    ("auto", "before [IMG]<image>[/IMG] after"),  # the template loops over parts: vLLM's "openai" format
    ("openai", "before [IMG]<image>[/IMG] after"),
    ("string", "<image>\nbefore \n after"),  # placeholders first, then the text parts joined
])
def test_chat_gives_a_template_that_loops_over_parts_its_image_parts(llm, content_format, user):
    image = random_image(30, 20, seed=4)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "before "}, {"type": "image_pil", "image_pil": image}, {"type": "text", "text": " after"},
    ]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=PARTS_TEMPLATE,
                    chat_template_content_format=content_format)[0]
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant"  # jinja drops the last newline
    assert chat.prompt == prompt
    ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
    direct = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


@pytest.mark.parametrize(("prompt", "images", "message"), [
    ("<image> one placeholder", [], "1 image placeholders"),
    ("no placeholder", ["IMAGE"], "0 image placeholders"),
    ("<image><image><image>", ["IMAGE"] * 3, "at most 2 allowed"),
    ("<image>", ["not an image"], "is not an image"),
])
def test_bad_image_inputs_are_refused(llm, prompt, images, message):
    images = [random_image(20, 20, seed=0) if i == "IMAGE" else i for i in images]
    with pytest.raises(ValueError, match=message):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, GREEDY, use_tqdm=False)
    assert _generate(llm, "still <image> working", [random_image(20, 20, seed=0)])


# Qwen2-VL: M-RoPE positions for the images' grids, decode positions continuing from the largest.


@pytest.mark.parametrize(("name", "chunked"), [("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", True)])
def test_qwen2_vl_matches_transformers(tmp_path, name, chunked):
    qwen2_vl = save_tiny_qwen2_vl(tmp_path, name)
    images = [random_image(60, 90, seed=12), random_image(100, 50, seed=13)]
    prompt = f"hi {QWEN_IMAGE} and {QWEN_IMAGE} end"
    text = "text only, plain positions"
    extra = dict(max_num_batched_tokens=8, enable_prefix_caching=False) if chunked else {}
    engine = LLM(str(qwen2_vl), device="cpu", dtype="float32", max_model_len=256, **extra)
    try:
        outputs = engine.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": images}}, text], GREEDY, use_tqdm=False
        )
    finally:
        engine.shutdown()
    assert outputs[0].outputs[0].token_ids == hf_qwen2_vl_greedy(qwen2_vl, prompt, images, MAX_TOKENS)
    assert outputs[1].outputs[0].token_ids == hf_qwen2_vl_greedy(qwen2_vl, text, [], MAX_TOKENS)


def test_preempted_image_requests_recompute_their_images(llava):
    # A pool of 24 blocks of 4 tokens: three image prompts of ~20 tokens growing by 24 cannot all
    # stay; those preempted are recomputed from their prompt, images encoded again.
    engine = LLM(str(llava), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                 num_gpu_blocks_override=24, enable_prefix_caching=False)
    try:
        images = [random_image(40 + 10 * i, 50, seed=20 + i) for i in range(3)]
        prompts = [{"prompt": f"<image>q{i}", "multi_modal_data": {"image": im}} for i, im in enumerate(images)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert engine.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()
    for i, (out, image) in enumerate(zip(outputs, images)):
        assert out.outputs[0].token_ids == hf_greedy_with_images(llava, f"<image>q{i}", [image], 24)
