"""Qwen2-VL and Qwen2.5-VL: transformers' own vision transformer (Qwen2.5-VL's with window attention) (2-D rotary patches, a 2x2 patch merger),
built from vision_config and loaded from the checkpoint, and Pagoda's Qwen2 language model with
M-RoPE (layers/rotary.py's MRotaryEmbedding; the runner gives each prefill chunk with images its
[3, T] positions, multimodal/mrope.py). As LLaVA's (models/llava.py), the tower runs only on
prefill chunks that reach image placeholders, a step's images packed into one call; decode steps
are the language model's alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.linear import LinearMethod
from pagoda.layers.rotary import MRotaryEmbedding
from pagoda.models.llava import VisionTower
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.multimodal.inputs import ImageInput
from pagoda.quantization.base import QuantizationConfig

# transformers 5 names the parts under `model.`; checkpoints do not.
_CHECKPOINT_PREFIXES = {"model.language_model.": "model.", "model.visual.": "visual."}


def _vision_model_class(model_type: str) -> type:
    if model_type == "qwen2_5_vl_vision":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return Qwen2VisionTransformerPretrainedModel


class Qwen2VisionTower(VisionTower):
    def __init__(self, vision_config: dict) -> None:
        torch.nn.Module.__init__(self)
        from transformers import AutoConfig

        config = AutoConfig.for_model(**vision_config)
        config._attn_implementation = "sdpa"
        self.model = _vision_model_class(config.model_type)._from_config(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values, grid_thw=grid_thw)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    is_multimodal = True

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int, linear_method: LinearMethod | None = None
    ) -> None:
        super().__init__(_text_spec(config), backend, max_position, linear_method)
        hf = config.hf_config
        # The runner reads it: this model's positions are M-RoPE's, over grids merged this much.
        self.mrope_merge_size = hf["vision_config"].get("spatial_merge_size", 2)
        sections = config.rope_parameters["mrope_section"]
        rotary = MRotaryEmbedding(config.head_dim, max_position, _text_spec(config).rope_parameters, sections)
        self.model.rotary = rotary
        for layer in self.model.layers:
            if hasattr(layer, "self_attn"):
                layer.self_attn.rotary = rotary
        self.visual = Qwen2VisionTower(hf["vision_config"])
        self.vision_dtype = torch.get_default_dtype()

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        vision = config.hf_config["vision_config"]
        d = vision.get("embed_dim") or vision["hidden_size"]  # Qwen2-VL's name, Qwen2.5-VL's
        width = vision.get("intermediate_size") or int(d * vision.get("mlp_ratio", 4))
        # Each block's attention (4 d^2) and MLP (up to 3 d x width); the merger is left out.
        tower = vision["depth"] * (4 * d * d + 3 * d * width)
        return super().weight_bytes(_text_spec(config), dtype, quant_config) + tower * dtype.itemsize

    @staticmethod
    def checkpoint_name(name: str) -> str:
        for new, old in _CHECKPOINT_PREFIXES.items():
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def encode_images(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Each image's merged patch features; all images in one tower call (the tower takes the
        images' patches as one packed sequence, each image attending within itself)."""
        tensors = [image.torch_tensors() for image in images]
        device = self.lm_head.weight.device
        pixels = torch.cat([t["pixel_values"] for t in tensors]).to(device, self.vision_dtype)
        grids = torch.cat([t["image_grid_thw"] for t in tensors])
        features = self.visual(pixels, grids.to(device))
        return list(features.split((grids.prod(-1) // self.mrope_merge_size**2).tolist()))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        return self.model(input_ids, positions, kv_caches, metadata, inputs_embeds)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    pass  # the tower differs, and its class is chosen by the vision config's model_type


def _text_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with plain rope parameters (M-RoPE's sections are the model's to apply)."""
    rope = {k: v for k, v in spec.rope_parameters.items() if k not in ("type", "mrope_section")}
    if rope.get("rope_type") == "mrope":
        rope["rope_type"] = "default"
    return dataclasses.replace(spec, rope_parameters=rope)
