"""The quantization seam (after vLLM's QuantizationConfig): a config read from the checkpoint's
`quantization_config` (or {} when quantizing at load) that hands each linear layer, by its module
path, the LinearMethod that holds and applies its weight. Models ask it once per layer; layers and
the weight loader know nothing of any format (pagoda/layers/linear.py slices checkpoint tensors
by the attributes a method sets on its parameters)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.linear import LinearMethod, UnquantizedLinearMethod

__all__ = ["LinearMethod", "QuantizationConfig", "UnquantizedLinearMethod", "linear_method_for", "matches_module"]


class QuantizationConfig(ABC):
    name: ClassVar[str]  # the --quantization value, vLLM's spelling
    # Our packed layer -> the checkpoint projections it holds (the model sets it before building its
    # layers), so a config that names checkpoint modules (ignore lists) can answer for packed ones.
    packed_modules_mapping: dict[str, list[str]]

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """From the checkpoint's quantization_config dict ({} when quantizing at load, e.g. dynamic fp8)."""

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer at our module path `prefix` (e.g. "model.layers.0.self_attn.qkv_proj");
        UnquantizedLinearMethod() for layers the config leaves unquantized."""

    def process_model_after_loading(self, model: nn.Module) -> None:
        """Once every weight is in and each linear method has prepared its own: what the method does
        to layers that are not linear (GGUF: its Q8_0 embeddings)."""

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError naming the flag or checkpoint field and what is supported."""

    @property
    def quantizes_checkpoint(self) -> bool:
        """Whether the checkpoint's weights are stored quantized (not quantized at load)."""
        return True

    def quantize_dummy_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """A random (`--load-format dummy`) weight [out, in] of a layer this config quantizes, as its
        checkpoint tensors by name (qweight, scales, ...): what a checkpoint-quantized method needs to
        run without a checkpoint. Raises ValueError where the format has no such rounding here."""
        raise ValueError(
            f"--load-format dummy cannot give a {self.name} model random weights: dummy weights run unquantized, "
            f"awq and quantized-at-load (--quantization fp8) models; pass a {self.name} checkpoint"
        )

    def weight_bytes(self, num_weights: int, dtype: torch.dtype) -> int:
        """Bytes of `num_weights` linear-layer weights held by this method (scales included, roughly)."""
        return num_weights * dtype.itemsize

    def checkpoint_modules(self, prefix: str) -> list[str]:
        """The checkpoint modules our layer at `prefix` holds: its parts where it is packed."""
        parent, _, name = prefix.rpartition(".")
        parts = getattr(self, "packed_modules_mapping", {}).get(name)
        return [f"{parent}.{part}" for part in parts] if parts else [prefix]


def linear_method_for(quant_config: QuantizationConfig | None, prefix: str) -> LinearMethod:
    return UnquantizedLinearMethod() if quant_config is None else quant_config.linear_method(prefix)


def matches_module(patterns: list[str], module: str) -> bool:
    """Whether a checkpoint module path matches one of compressed-tensors' / transformers' names:
    "re:<regex>" (matched against the path), a whole path, or its last component(s)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


def all_parts_match(patterns: list[str], prefix: str, quant_config: QuantizationConfig, field: str) -> bool:
    """Whether the checkpoint modules of our layer at `prefix` match the names in `patterns` (an
    ignore list, a group's targets); ValueError where only some parts of a packed layer do: its one
    matmul holds one weight format."""
    matched = [matches_module(patterns, module) for module in quant_config.checkpoint_modules(prefix)]
    if any(matched) and not all(matched):
        raise ValueError(
            f"quantization_config.{field} names only part of the packed layer {prefix}: "
            "its parts must be quantized alike"
        )
    return all(matched)
