"""Vision-language serving on the GPU, as issue 24 measures it: a Qwen2-VL-7B-shaped model (the
config values of Qwen/Qwen2-VL-7B-Instruct, random weights; `--arch llava`: LLaVA-1.5-7B's shape,
a CLIP ViT-L/14-336 tower and Llama-2-7B) on 256 requests, each one random 448x448 image and a
64-token text prompt -> 128 tokens (EOS ignored), through LLM.generate in bfloat16; then
transformers' generate in the same process on the first 64 requests (batches of 32: bounded, so
the two are compared by output tokens/s). Prints both rates, and the vision encoder's share of
Pagoda's wall time (each step's encoder call timed between device syncs) with the images per
encoder call (a step's images are encoded together).

    python scripts/bench_vlm_gpu.py [--arch qwen2_vl|llava] [--tiny]

--tiny: tiny random shapes and a few requests, on the CPU in float32, to check the script end
to end where there is no GPU."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from pagoda import LLM, SamplingParams
from tests.serving import save_tokenizer
from tests.tiny_vlm import QWEN_IMAGE, QWEN_SPECIALS, QWEN_VL, qwen2_vl_inputs

IMAGE_SIZE = 448


@dataclasses.dataclass(frozen=True)
class Scale:
    requests: int
    hf_requests: int  # transformers runs the first of them
    hf_batch: int
    text_tokens: int
    output_tokens: int
    device: str
    dtype: torch.dtype


FULL = Scale(256, 64, 32, 64, 128, "cuda", torch.bfloat16)
TINY = Scale(6, 4, 2, 16, 8, "cpu", torch.float32)

# Qwen/Qwen2-VL-7B-Instruct's config.json values.
QWEN2_VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False,
)
QWEN2_VL_7B_VISION = dict(
    depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2,
)
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=2048,
)


def _tokenizer(directory: Path, specials: list[str]) -> transformers.PreTrainedTokenizerBase:
    save_tokenizer(directory / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "tok")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def save_qwen2_vl(directory: Path, tiny: bool) -> Path:
    tokenizer = _tokenizer(directory, QWEN_SPECIALS)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text = {**TINY_TEXT, "vocab_size": len(tokenizer), "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    config = transformers.Qwen2VLConfig(
        text_config=text if tiny else QWEN2_VL_7B_TEXT,
        vision_config=QWEN_VL["qwen2_vl"][2] if tiny else QWEN2_VL_7B_VISION,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        architectures=["Qwen2VLForConditionalGeneration"], dtype="bfloat16",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    path = directory / "qwen2-vl"
    config.save_pretrained(path)
    # The Instruct model's preprocessor_config.json: 448x448 stays 448x448, 32x32 patches, 256 tokens.
    transformers.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_llava(directory: Path, tiny: bool) -> Path:
    tokenizer = _tokenizer(directory, ["<image>"])
    side, patch = (56, 14) if tiny else (336, 14)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=side,
        patch_size=patch, projection_dim=32,
    ) if tiny else transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=side,
        patch_size=patch, projection_dim=768,
    )
    text = transformers.LlamaConfig(**TINY_TEXT, vocab_size=len(tokenizer)) if tiny else transformers.LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        architectures=["LlavaForConditionalGeneration"], dtype="bfloat16",
    )
    path = directory / "llava"
    config.save_pretrained(path)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                                        crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


ARCHS: dict[str, tuple[Callable[[Path, bool], Path], str]] = {
    "qwen2_vl": (save_qwen2_vl, QWEN_IMAGE), "llava": (save_llava, "<image>"),
}


def requests(count: int, image_mark: str, scale: Scale, seed: int = 0) -> tuple[list[str], list]:
    """Prompts (the image's mark, then random letters: one token each) and one random image each."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    prompts, images = [], []
    for _ in range(count):
        letters = torch.randint(0, 26, (scale.text_tokens,), generator=generator)
        prompts.append(image_mark + "".join(chr(97 + int(c)) for c in letters))
        pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    return prompts, images


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def llm_inputs(prompts: list[str], images: list) -> list[dict]:
    return [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]


def run_pagoda(path: Path, scale: Scale, batch: list[dict], warm_up: list[dict]) -> dict:
    dtype = str(scale.dtype).removeprefix("torch.")
    llm = LLM(str(path), load_format="dummy", max_model_len=2048, device=scale.device, dtype=dtype,
              gpu_memory_utilization=0.6)
    model = llm.llm_engine.engine_core.engine_core.executor.worker.runner.model
    encode = model.encode_images
    encoder = {"seconds": 0.0, "calls": 0, "images": 0}

    def timed_encode(step_images):
        _sync(scale.device)
        started = time.perf_counter()
        out = encode(step_images)
        _sync(scale.device)
        encoder["seconds"] += time.perf_counter() - started
        encoder["calls"] += 1
        encoder["images"] += len(step_images)
        return out

    model.encode_images = timed_encode
    params = SamplingParams(max_tokens=scale.output_tokens, temperature=0, ignore_eos=True)
    llm.generate(warm_up, params, use_tqdm=False)  # other images: the prefix cache must not hold the measured ones
    encoder.update(seconds=0.0, calls=0, images=0)
    started = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.shutdown()
    del model.encode_images  # the wrapper holds the model
    return {"requests": len(batch), "wall_s": wall, "output_tok_s": tokens / wall,
            "encoder_s": encoder["seconds"], "encoder_share": encoder["seconds"] / wall,
            "encoder_calls": encoder["calls"], "images_per_encoder_call": encoder["images"] / max(1, encoder["calls"])}


def _hf_inputs(arch: str, path: Path, model, prompts: list[str], images: list) -> dict:
    if arch == "qwen2_vl":
        return qwen2_vl_inputs(model, transformers.AutoTokenizer.from_pretrained(path),
                               transformers.AutoImageProcessor.from_pretrained(path), prompts, [[im] for im in images])
    processor = transformers.AutoProcessor.from_pretrained(path)
    inputs = processor(text=prompts, images=images, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def run_transformers(arch: str, path: Path, scale: Scale, prompts: list[str], images: list) -> dict:
    gc.collect()  # Pagoda's model and KV pool, unreferenced since run_pagoda returned
    if scale.device == "cuda":
        torch.cuda.empty_cache()
    config = transformers.AutoConfig.from_pretrained(path)
    torch.set_default_dtype(scale.dtype)
    with torch.device(scale.device):
        model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None

    def generate(first: int, count: int, new_tokens: int) -> int:
        inputs = _hf_inputs(arch, path, model, prompts[first:first + count], images[first:first + count])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    generate(0, 1, 2)  # warm-up
    tokens, started = 0, time.perf_counter()
    for first in range(0, scale.hf_requests, scale.hf_batch):
        tokens += generate(first, scale.hf_batch, scale.output_tokens)
    wall = time.perf_counter() - started
    return {"requests": scale.hf_requests, "batch": scale.hf_batch, "wall_s": wall, "output_tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen2_vl", help="the model's shape")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, a few requests, CPU float32")
    args = parser.parse_args()
    scale = TINY if args.tiny else FULL
    save, image_mark = ARCHS[args.arch]
    prompts, images = requests(scale.requests, image_mark, scale)
    warm_up = llm_inputs(*requests(4, image_mark, scale, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), args.tiny)
        result = {"arch": args.arch, "tiny": args.tiny, "pagoda": run_pagoda(path, scale, llm_inputs(prompts, images), warm_up)}
        print(json.dumps(result), flush=True)
        result["transformers"] = run_transformers(args.arch, path, scale, prompts, images)
    result["speedup"] = result["pagoda"]["output_tok_s"] / result["transformers"]["output_tok_s"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
