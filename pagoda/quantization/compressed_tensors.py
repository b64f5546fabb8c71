"""compressed-tensors checkpoints (llm-compressor's format, `quant_method: "compressed-tensors"`):
`config_groups` each name the layers they quantize (`targets`: "Linear", a module name, or
"re:<regex>") and a scheme (`weights`, `input_activations`); `ignore` lists the layers left
unquantized. The schemes run through the methods of their own modules:
- float 8-bit weights (`float-quantized`: fp8 `weight`, `weight_scale` per channel or tensor)
  with dynamic per-token or static per-tensor (`input_scale`) fp8 activations: fp8.py;
- int 8-bit symmetric weights with dynamic per-token int8 activations (W8A8 INT8): int8.py;
- int 4-bit weight-only (`pack-quantized`, W4A16): pagoda/quantization/w4a16.py."""

from __future__ import annotations

from typing import Any

from pagoda.layers.linear import LinearMethod, UnquantizedLinearMethod
from pagoda.quantization.base import QuantizationConfig, all_parts_match
from pagoda.quantization.fp8 import Fp8LinearMethod
from pagoda.quantization.int8 import Int8LinearMethod
from pagoda.quantization.w4a16 import compressed_tensors_w4a16_method

_WEIGHT_STRATEGIES = ("channel", "tensor")


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, groups: dict[str, dict[str, Any]], ignore: list[str], format: str | None) -> None:
        self.groups = groups
        self.ignore = ignore
        self.format = format

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        groups = config.get("config_groups")
        if not groups:
            raise ValueError(
                "quantization_config.config_groups is missing: a compressed-tensors checkpoint states its schemes there"
            )
        made = cls(groups, list(config.get("ignore") or []), config.get("format"))
        for name, group in groups.items():
            made._method(name, group)  # refuse an unsupported scheme at start-up, not at the first layer
        return made

    def linear_method(self, prefix: str) -> LinearMethod:
        if all_parts_match(self.ignore, prefix, self, "ignore"):
            return UnquantizedLinearMethod()
        for name, group in self.groups.items():
            targets = group.get("targets") or []
            if "Linear" in targets or all_parts_match(targets, prefix, self, f"config_groups.{name}.targets"):
                return self._method(name, group)
        return UnquantizedLinearMethod()

    def _method(self, name: str, group: dict[str, Any]) -> LinearMethod:
        """The LinearMethod of one config group's scheme; ValueError naming the field otherwise."""
        field = f"quantization_config.config_groups.{name}"
        weights = group.get("weights") or {}
        acts = group.get("input_activations")
        kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
        group_format = group.get("format") or self.format
        if group_format == "pack-quantized" and kind == "int" and acts is None:
            return compressed_tensors_w4a16_method(group)
        if bits != 8 or kind not in ("float", "int"):
            raise ValueError(
                f"{field}.weights (type={kind!r}, num_bits={bits}, format={group_format!r}) is not supported: "
                "supported are 8-bit float (W8A8 FP8), 8-bit int with int8 activations (W8A8 INT8), and 4-bit int "
                "pack-quantized weight-only (W4A16)"
            )
        if strategy not in _WEIGHT_STRATEGIES:
            raise ValueError(f"{field}.weights.strategy={strategy!r} is not supported for 8-bit weights: use one of "
                             f"{_WEIGHT_STRATEGIES}")
        if not weights.get("symmetric", True):
            raise ValueError(f"{field}.weights.symmetric=false is not supported for 8-bit weights: symmetric only")
        channel = strategy == "channel"
        if kind == "float":
            static = acts is not None and not acts.get("dynamic", False)
            if static and acts.get("strategy") != "tensor":
                raise ValueError(f"{field}.input_activations: static fp8 activations need strategy 'tensor'")
            return Fp8LinearMethod(serialized=True, static_input=static, channel_scales=channel)
        if acts is None or not acts.get("dynamic", False) or acts.get("type") != "int" or acts.get("num_bits") != 8:
            raise ValueError(
                f"{field}.input_activations={acts!r} is not supported with int8 weights: "
                "dynamic per-token int8 activations (W8A8 INT8) only"
            )
        return Int8LinearMethod(channel_scales=channel)

