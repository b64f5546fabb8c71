"""A tiny random LLaVA (CLIP vision tower, projector, Llama) saved with its processor: a
CLIPImageProcessor and the tests' byte-level tokenizer with an <image> token; the same as
LLaVA-NeXT (any-resolution tiles, image_newline); and transformers' own greedy tokens for a prompt
with images, to compare with."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from PIL import Image

from tests.serving import save_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 56  # the processor's crop: (56 / 14) ** 2 = 16 placeholders per image
PATCH_SIZE = 14


# LLaVA-NeXT's tiles: one 56x56 tile (16 features) or two side by side, or four in a square.
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


# A template that loops over a message's parts and writes each image's tokens itself, as Qwen2-VL's does.
PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for part in m.content %}{% if part.type == 'image' %}[IMG]<image>[/IMG]{% else %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def save_tiny_llava(directory: Path, seed: int = 0, next_: bool = False) -> Path:
    """The tiny LLaVA-1.5, or with next_ the tiny LLaVA-NeXT (the same parts, any-resolution tiles)."""
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
    config_cls, model_cls, processor_cls = (
        (transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextProcessor)
        if next_ else (transformers.LlavaConfig, transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor)
    )
    tiles = {"image_grid_pinpoints": GRID_PINPOINTS} if next_ else {}
    config = config_cls(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        architectures=[model_cls.__name__], eos_token_id=1, **tiles,
    )
    torch.manual_seed(seed)
    path = directory / ("llava_next" if next_ else "llava")
    model_cls(config).float().eval().save_pretrained(path)
    image_processor = (transformers.LlavaNextImageProcessor if next_ else transformers.CLIPImageProcessor)(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **tiles
    )
    processor = processor_cls(
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
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


# name -> (config class, model class, vision config): Qwen2.5-VL's tower has window attention
# (a window of 56 pixels, full attention in its second block) and a gated MLP.
QWEN_VL = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, dict(
        depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, in_chans=3,
    )),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration, dict(
        depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, in_chans=3, window_size=56, fullatt_block_indexes=[1],
    )),
}


def save_tiny_qwen2_vl(directory: Path, name: str = "qwen2_vl", seed: int = 0) -> Path:
    """A tiny random Qwen2-VL or Qwen2.5-VL (2-block vision transformer, 2x2 merger, M-RoPE sections 2/3/3) with
    its image processor and the byte-level tokenizer with Qwen's vision tokens. No processor
    config: Qwen2VLProcessor needs torchvision for its video half; the engine falls back to the
    image processor."""
    save_tokenizer(directory / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    config_cls, model_cls, vision = QWEN_VL[name]
    config = config_cls(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=0, eos_token_id=1,
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        architectures=[model_cls.__name__], bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    path = directory / name
    model_cls(config).float().eval().save_pretrained(path)
    transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_qwen2_vl_greedy(path: Path, prompt: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, each <|image_pad|> expanded to its image's merged patches."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    inputs = qwen2_vl_inputs(model, tokenizer, image_processor, [prompt], [images])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def qwen2_vl_inputs(model, tokenizer, image_processor, prompts: list[str], images: list[list[Image.Image]]) -> dict:
    """A Qwen2-VL model's generate inputs for prompts of equal expanded length (no padding), each
    <|image_pad|> expanded to its image's merged patches (Qwen2VLProcessor's work, which needs
    torchvision for its video half)."""
    import inspect

    pad, merge = model.config.image_token_id, model.config.vision_config.spatial_merge_size
    features = [image_processor([image], return_tensors="pt") for row in images for image in row]
    grids = iter(f["image_grid_thw"] for f in features)
    rows = []
    for prompt in prompts:
        ids: list[int] = []
        for token in tokenizer.encode(prompt):
            ids += [pad] * (int(next(grids).prod()) // merge**2) if token == pad else [token]
        rows.append(ids)
    input_ids = torch.tensor(rows)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if features:
        inputs["pixel_values"] = torch.cat([f["pixel_values"] for f in features]).to(model.dtype)
        inputs["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in features])
    # transformers >= 5.2x takes the token types (image: 1) that M-RoPE is computed from.
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        inputs["mm_token_type_ids"] = (input_ids == pad).int()
    return {name: value.to(model.device) for name, value in inputs.items()}
