"""The front end's side of images: a prompt's token ids with one image placeholder token per
image, and its images, become the ids with each placeholder expanded to the image's feature count
and an ImageInput per image, preprocessed by the model's own transformers processor (AutoProcessor).
Expanding token ids (not text) serves text prompts, token-id prompts and rendered chats alike."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagoda.multimodal.inputs import ImageInput, TensorData

# Larger images are refused before they are decoded (PIL's own bomb guard is at 179 Mpx).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Images per prompt without --limit-mm-per-prompt: vLLM's default (the prompt's length bounds them too).
DEFAULT_IMAGE_LIMIT = 999


def is_multimodal_config(hf_config: Any) -> bool:
    """A vision-language model's config: a language model's config with a vision encoder's."""
    return getattr(hf_config, "vision_config", None) is not None and getattr(hf_config, "text_config", None) is not None


def image_token_id(hf_config: Any) -> int:
    """The id of the placeholder token the model's image features replace."""
    for name in ("image_token_index", "image_token_id"):
        value = getattr(hf_config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"the {hf_config.model_type} config names no image token (image_token_index)")


def image_hash(image: Any) -> str:
    """A digest of what the model sees of an image: its mode, size and pixels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def check_image(image: Any, what: str) -> None:
    """ValueError naming `what` for something that is no PIL image, or one with too many pixels."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} is not an image (a PIL.Image.Image), but {type(image).__name__}")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} has {image.width}x{image.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed"
        )


@dataclass(frozen=True)
class ImageSources:
    """Where image URLs may point besides data: URLs: the web (--allow-image-url-fetch), and files
    under one folder of the server's (vLLM's --allowed-local-media-path; None: no file:// URLs)."""

    allow_fetch: bool = False
    local_dir: Path | None = None


class ImageProcessor:
    """One model's image preprocessing, loaded once by the front end."""

    def __init__(
        self, model_dir: Path, hf_config: Any, limit_per_prompt: dict[str, int] | None,
        sources: ImageSources = ImageSources(), trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        self.token_id = image_token_id(hf_config)
        try:
            self.processor = AutoProcessor.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
            self.image_processor = self.processor.image_processor
            self.placeholder: str = self.processor.image_token  # the placeholder as text, for chats
        except ImportError:
            # Qwen2-VL's processor also loads its video processor, which needs torchvision:
            # images need only the image processor.
            self.processor = None
            self.image_processor = AutoImageProcessor.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
            self.placeholder = tokenizer.convert_ids_to_tokens(self.token_id)
        self.max_images = (limit_per_prompt or {}).get("image", DEFAULT_IMAGE_LIMIT)
        self.sources = sources

    def chat_images(self, conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """A chat's images, and the chat with {"type": "image"} parts where they were
        (media.ImagePartError); render it with `placeholder` as the image placeholder."""
        from pagoda.multimodal.media import extract_images

        return extract_images(conversation, self.sources, self.max_images)

    def check_count(self, num_images: int) -> None:
        if num_images > self.max_images:
            raise ValueError(
                f"{num_images} images in one prompt: at most {self.max_images} allowed (--limit-mm-per-prompt)"
            )

    def process(self, prompt_token_ids: list[int], images: list[Any]) -> tuple[list[int], list[ImageInput]]:
        """The expanded prompt and its ImageInputs, or a ValueError naming what is wrong."""
        self.check_count(len(images))
        for i, image in enumerate(images):
            check_image(image, f"image {i}")
        placeholders = [i for i, t in enumerate(prompt_token_ids) if t == self.token_id]
        if len(placeholders) != len(images):
            raise ValueError(
                f"the prompt has {len(placeholders)} image placeholders ({self.placeholder!r}) for {len(images)} "
                "images: it needs one per image"
            )
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        last = 0
        for position, image in zip(placeholders, images):
            image = image.convert("RGB")
            tensors = self.image_processor([image], return_tensors="pt")
            length = self._num_features(image, tensors)
            expanded.extend(prompt_token_ids[last:position])
            inputs.append(ImageInput(
                len(expanded), length, image_hash(image),
                {name: TensorData.from_tensor(value) for name, value in tensors.items()},
            ))
            expanded.extend([self.token_id] * length)
            last = position + 1
        expanded.extend(prompt_token_ids[last:])
        return expanded, inputs

    def _num_features(self, image: Any, tensors: Any) -> int:
        grid = tensors.get("image_grid_thw")
        if grid is not None:  # Qwen2-VL: one feature per merged patch of the grid
            return int(grid.prod()) // self.image_processor.merge_size**2
        counts = self.processor._get_num_multimodal_tokens(image_sizes=[[image.height, image.width]])
        return int(counts["num_image_tokens"][0])
