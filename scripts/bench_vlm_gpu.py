"""Vision-language serving on the GPU, as issue 24 measures it but with LLaVA-1.5-7B's shape (CLIP
ViT-L/14-336 tower, Llama-2-7B language model, random weights; Qwen2-VL is not built yet): 256
requests, each one random 448x448 image and a 64-token text prompt -> 128 tokens (EOS ignored),
through LLM.generate, then through transformers' generate in batches of 64 in the same process.
Prints output tokens/s of both and the vision encoder's share of Pagoda's wall time (each image
encode timed between device syncs).

    python scripts/bench_vlm_gpu.py"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from pagoda import LLM, SamplingParams
from tests.serving import save_tokenizer

NUM_REQUESTS, TEXT_TOKENS, OUTPUT_TOKENS, HF_BATCH = 256, 64, 128, 64


def save_llava_7b_shape(directory: Path) -> Path:
    save_tokenizer(directory / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "tok")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768,
    )
    text = transformers.LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        architectures=["LlavaForConditionalGeneration"], dtype="bfloat16",
    )
    path = directory / "llava-7b-shape"
    config.save_pretrained(path)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 336},
                                                        crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


def requests() -> tuple[list[str], list]:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    prompts, images = [], []
    for i in range(NUM_REQUESTS):
        text = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (TEXT_TOKENS,), generator=generator))
        prompts.append("<image>" + text)
        pixels = torch.randint(0, 256, (448, 448, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    return prompts, images


def run_pagoda(path: Path, prompts: list[str], images: list) -> dict:
    llm = LLM(str(path), load_format="dummy", max_model_len=2048, gpu_memory_utilization=0.6)
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.runner
    encode, encoder_s = runner.model.encode_image, [0.0]

    def timed_encode(image):
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = encode(image)
        torch.cuda.synchronize()
        encoder_s[0] += time.perf_counter() - started
        return out

    runner.model.encode_image = timed_encode
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True)
    batch = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
    llm.generate(batch[:4], params, use_tqdm=False)  # warm-up
    encoder_s[0] = 0.0
    started = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.shutdown()
    del llm, runner
    torch.cuda.empty_cache()
    return {"wall_s": wall, "output_tok_s": tokens / wall, "encoder_s": encoder_s[0],
            "encoder_share": encoder_s[0] / wall, "images_encoded": NUM_REQUESTS}


def run_transformers(path: Path, prompts: list[str], images: list) -> dict:
    processor = transformers.AutoProcessor.from_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(path)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlavaForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None
    tokens, started = 0, time.perf_counter()
    for first in range(0, NUM_REQUESTS, HF_BATCH):
        inputs = processor(text=prompts[first:first + HF_BATCH], images=images[first:first + HF_BATCH],
                           return_tensors="pt").to("cuda")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                                 do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    wall = time.perf_counter() - started
    return {"wall_s": wall, "output_tok_s": tokens / wall}


def main() -> None:
    prompts, images = requests()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_llava_7b_shape(Path(tmp))
        result = {"pagoda": run_pagoda(path, prompts, images)}
        print(json.dumps(result), flush=True)
        result["transformers"] = run_transformers(path, prompts, images)
    result["speedup"] = result["pagoda"]["output_tok_s"] / result["transformers"]["output_tok_s"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
