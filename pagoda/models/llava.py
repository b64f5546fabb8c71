"""LLaVA-1.5 style vision-language models (LlavaForConditionalGeneration): a CLIP or SigLIP
vision tower, a two-layer projector and a Pagoda language model (Llama/Mistral/Qwen2 by the text
config's architecture); LLaVA-NeXT (LlavaNextForConditionalGeneration) adds any-resolution tiles
(the processor's image_grid_pinpoints), unpadding and the `image_newline` row, packed by
transformers' own code. The vision tower is transformers' own vision model, built from the config
and loaded from the checkpoint; it runs only on prefill chunks that cover image placeholders
(multimodal/encoder_cache.py), all of a step's images (or tiles) of one shape in one call, so
decode steps and their CUDA graphs are the language model's alone. Tensor parallelism splits the
language model; the tower and projector are replicated."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.linear import LinearMethod
from pagoda.models.interface import CausalLM
from pagoda.multimodal.inputs import ImageInput
from pagoda.quantization.base import QuantizationConfig

# transformers 5 names the parts under `model.`; checkpoints (and older transformers) do not.
_CHECKPOINT_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "model.image_newline": "image_newline",  # LLaVA-NeXT's
}


class VisionTower(nn.Module):
    """transformers' vision model for the config; loads its checkpoint tensors itself, under the
    names transformers gives them (with or without CLIP's `vision_model.` level)."""

    loads_checkpoint_subtree = True

    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.for_model(**vision_config)
        config._attn_implementation = "sdpa"
        self.model = AutoModel.from_config(config)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        params = dict(self.model.named_parameters())
        for candidate in (name, name.removeprefix("vision_model."), f"vision_model.{name}"):
            if candidate in params:
                params[candidate].data.copy_(tensor)
                return
        raise ValueError(f"checkpoint tensor vision_tower.{name} has no place in the vision tower")

    def forward(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[layer]


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def text_spec(spec: ModelSpec) -> ModelSpec:
    """The language model's spec: the multimodal spec's fields, under the text config's architecture."""
    from pagoda.models import text_architecture

    text = spec.hf_config["text_config"]
    return dataclasses.replace(spec, architecture=text_architecture(text), hf_config=text)


class LlavaForConditionalGeneration(CausalLM):
    is_multimodal: ClassVar[bool] = True

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int, linear_method: LinearMethod | None = None
    ) -> None:
        super().__init__(config, backend, max_position, linear_method)
        from pagoda.models import model_class

        hf = config.hf_config
        text = text_spec(config)
        self.language_model = model_class(text.architecture)(text, backend, max_position, linear_method)
        self.packed_modules_mapping = self.language_model.packed_modules_mapping
        self.ignored_checkpoint_suffixes = self.language_model.ignored_checkpoint_suffixes
        self.vision_tower = VisionTower(hf["vision_config"])
        self.projector_dtype = torch.get_default_dtype()
        self.multi_modal_projector = LlavaProjector(
            hf["vision_config"]["hidden_size"], config.hidden_size, hf.get("projector_hidden_act", "gelu"),
            hf.get("multimodal_projector_bias", True),
        )
        self.feature_layer = hf.get("vision_feature_layer", -2)
        self.feature_strategy = hf.get("vision_feature_select_strategy", "default")  # default: drop CLS

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        from pagoda.models import model_class

        text = text_spec(config)
        vision = config.hf_config["vision_config"]
        # The tower's layers: attention (4 h^2) and MLP (2 h i); the projector's two matrices.
        h, i = vision["hidden_size"], vision["intermediate_size"]
        tower = vision["num_hidden_layers"] * (4 * h * h + 2 * h * i)
        projector = h * config.hidden_size + config.hidden_size**2
        text_bytes = model_class(text.architecture).weight_bytes(text, dtype, quant_config)  # the tower stays unquantized
        return text_bytes + (tower + projector) * dtype.itemsize

    @staticmethod
    def checkpoint_name(name: str) -> str:
        for new, old in _CHECKPOINT_PREFIXES.items():
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def tied_parameters(self) -> dict[str, str]:
        return {
            f"language_model.{param}": f"language_model.{source}"
            for param, source in self.language_model.tied_parameters().items()
        }

    def encode_images(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Each image's features in the language model's embedding space: [placeholders, hidden]."""
        tiles = self.project_tiles([image.torch_tensors()["pixel_values"] for image in images])
        return [features.flatten(0, 1) for features in tiles]

    def project_tiles(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's tiles [tiles, channels, height, width] through the tower and projector:
        [tiles, patches, hidden]. The tiles of all images that share a shape go through the tower
        in one call."""
        device = self.multi_modal_projector.linear_1.weight.device
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, tiles in enumerate(pixels):
            by_shape.setdefault(tuple(tiles.shape[1:]), []).append(i)
        projected: list[torch.Tensor] = [torch.empty(0)] * len(pixels)
        for members in by_shape.values():
            batch = torch.cat([pixels[i] for i in members]).to(device, self.projector_dtype)
            features = self.vision_tower(batch, self.feature_layer)
            if self.feature_strategy == "default":
                features = features[:, 1:]
            parts = self.multi_modal_projector(features).split([len(pixels[i]) for i in members])
            for i, part in zip(members, parts):
                projected[i] = part
        return projected

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        return self.language_model.model(input_ids, positions, kv_caches, metadata, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        return self.language_model.compute_logits(hidden, argmax_only)


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT (llava-v1.6): each image is a base tile and the tiles of its best grid
    resolution; the grid's features are unpadded to the image's aspect ratio and each row ends in
    the learned `image_newline` (the processor counts the placeholders the same way)."""

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int, linear_method: LinearMethod | None = None
    ) -> None:
        super().__init__(config, backend, max_position, linear_method)
        from transformers import AutoConfig

        self.image_newline = nn.Parameter(torch.empty(config.hidden_size))
        # transformers' pack_image_features reads its model's config (tile size, grid pinpoints).
        self.packing = SimpleNamespace(config=AutoConfig.for_model(**config.hf_config))

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        return super().weight_bytes(config, dtype, quant_config) + config.hidden_size * dtype.itemsize

    def encode_images(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        tensors = [image.torch_tensors() for image in images]
        # The processor gives one image's tiles as [1, tiles, channels, height, width].
        tiles = self.project_tiles([t["pixel_values"][0] for t in tensors])
        sizes = torch.cat([t["image_sizes"] for t in tensors])
        packed, _ = LlavaNextModel.pack_image_features(
            self.packing, tiles, sizes, self.feature_strategy, self.image_newline
        )
        return list(packed)
