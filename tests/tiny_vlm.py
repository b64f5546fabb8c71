"""A tiny random LLaVA (CLIP vision tower, projector, Llama) saved with its processor: a
CLIPImageProcessor and the tests' byte-level tokenizer with an <image> token; and transformers'
own greedy tokens for a prompt with images, to compare with."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from PIL import Image

from tests.serving import save_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 56  # the processor's crop: (56 / 14) ** 2 = 16 placeholders per image
PATCH_SIZE = 14


def save_tiny_llava(directory: Path, seed: int = 0) -> Path:
    tok_dir = directory / "tokenizer"
    save_tokenizer(tok_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        architectures=["LlavaForConditionalGeneration"], eos_token_id=1,
    )
    torch.manual_seed(seed)
    path = directory / "llava"
    transformers.LlavaForConditionalGeneration(config).float().eval().save_pretrained(path)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image of this size."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def hf_greedy_with_images(path: Path, prompt: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of a text prompt with its images, EOS ignored."""
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
