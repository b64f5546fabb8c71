"""FP8 (float8_e4m3fn) weights, vLLM's `--quantization fp8`: a bf16/fp16 checkpoint quantized at
load (per-output-channel weight scales), or a checkpoint stored in fp8 (Hugging Face
`quant_method: "fp8"`: `weight` in fp8 with a per-tensor `weight_scale`, and with
`activation_scheme: "static"` an `input_scale`; compressed-tensors' float8 schemes reuse the method
with per-channel or per-tensor weight scales).

On GPUs with FP8 tensor cores (compute capability >= 8.9) activations are quantized per token (or
by the static input scale) and the GEMM runs through `torch._scaled_mm` with row-wise scales;
elsewhere (the CPU, older GPUs) the weight is dequantized to the compute dtype for the matmul."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pagoda.layers.linear import (
    Fp8Input,
    InputQuantization,
    LinearMethod,
    UnquantizedLinearMethod,
    linear,
    sliced_param,
)
from pagoda.quantization.base import QuantizationConfig, all_parts_match

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
ACTIVATION_SCHEMES = ("static", "dynamic")
# torch._scaled_mm (cuBLASLt) needs K and N multiples of 16.
_SCALED_MM_ALIGN = 16


def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores (Ada / Hopper and later: compute capability >= 8.9)."""
    if device.type != "cuda":
        return False
    from pagoda.kernels.device_info import has_fp8  # a CUDA GPU: Triton is there

    return has_fp8(device)


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 rows, float32 scale per row): each row scaled so that its largest magnitude is FP8_MAX."""
    scale = w.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def per_channel_scales(scale: torch.Tensor, part_sizes: list[int]) -> torch.Tensor:
    """A weight scale as one float32 value per output row: per-channel scales as they are, one
    per-tensor scale per part of a packed layer repeated over that part's rows (exact: no requantization)."""
    scale = scale.float().reshape(-1)
    if scale.numel() == sum(part_sizes):
        return scale
    sizes = torch.tensor(part_sizes, device=scale.device)
    return scale.expand(len(part_sizes)).repeat_interleave(sizes)


def dequantize_rows(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight * scale (one scale per row), in `dtype`."""
    return (weight.to(torch.float32) * scale[:, None]).to(dtype)


class Fp8LinearMethod(LinearMethod):
    """serialized: the checkpoint holds fp8 `weight` and `weight_scale` (per-tensor: one per part
    of a packed layer; or per channel); else the checkpoint's weight is quantized at load.
    static_input: activations scaled by the checkpoint's `input_scale` instead of per token."""

    def __init__(self, serialized: bool, static_input: bool = False, channel_scales: bool = False) -> None:
        self.serialized = serialized
        self.static_input = static_input
        self.channel_scales = channel_scales

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        if not self.serialized:
            UnquantizedLinearMethod().create_weights(layer, input_size, output_size)
            return
        parts = len(layer.part_sizes)
        layer.weight = sliced_param(torch.empty(output_size, input_size, dtype=FP8), output_dim=0, input_dim=1)
        if self.channel_scales:
            layer.weight_scale = sliced_param(torch.empty(output_size, 1, dtype=torch.float32), output_dim=0)
        else:
            layer.weight_scale = sliced_param(torch.empty(parts, dtype=torch.float32), per_part=True)
        if self.static_input:
            layer.input_scale = sliced_param(torch.empty(parts, dtype=torch.float32), per_part=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.serialized:
            weight, scale = layer.weight.data, per_channel_scales(layer.weight_scale.data, layer.part_sizes)
        else:
            weight, scale = quantize_fp8_rows(layer.weight.data)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.reshape(-1).contiguous(), requires_grad=False)
        if self.static_input:
            # One activation scale for the matmul: the largest part's (as vLLM folds them).
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(1), requires_grad=False)
        out_features, in_features = weight.shape
        layer.fp8_gemm = (
            fp8_gemm_supported(weight.device)
            and in_features % _SCALED_MM_ALIGN == 0 and out_features % _SCALED_MM_ALIGN == 0
        )
        layer.fp8_input = InputQuantization(FP8, layer.input_scale if self.static_input else None)

    def input_quantization(self, layer: nn.Module) -> InputQuantization | None:
        return layer.fp8_input if layer.fp8_gemm else None

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Input, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Fp8Input):  # quantized by the kernel that produced it
            out = scaled_mm(x.data, x.scale, layer.weight, layer.weight_scale, x.dtype)
        elif not layer.fp8_gemm:
            return linear(x, dequantize_rows(layer.weight, layer.weight_scale, x.dtype), bias)
        else:
            from pagoda.kernels.elementwise import fp8_quantize_rows  # fp8_gemm: a CUDA GPU

            qx, x_scale = fp8_quantize_rows(x.reshape(-1, x.shape[-1]).contiguous(), *layer.fp8_input)
            out = scaled_mm(qx, x_scale, layer.weight, layer.weight_scale, x.dtype).reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias


def scaled_mm(
    qx: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(qx * x_scale) @ (weight * weight_scale)^T in `dtype`: qx [M, K] fp8 with x_scale [M, 1],
    weight [N, K] fp8 with weight_scale [N]. Through cuBLASLt's FP8 GEMM (row-wise scaling gives
    bf16 only, so other dtypes are cast from it), or Triton's where they were measured faster: on
    Hopper, prefill chunks and most decode batches; elsewhere the decode shapes that cuBLASLt spreads
    over too few SMs (pagoda/kernels/fp8_gemm.py)."""
    # a CUDA GPU: Triton is there
    from pagoda.kernels.fp8_gemm import decode_config, fp8_gemm, fp8_gemm_persistent, persistent_config

    config = persistent_config(qx, weight, dtype)
    if config is not None:
        return fp8_gemm_persistent(qx, x_scale, weight, weight_scale, dtype, config)
    config = decode_config(qx.shape[0], weight.shape[0], weight.shape[1], qx.device)
    if config is not None:
        return fp8_gemm(qx, x_scale, weight, weight_scale, dtype, config)
    out = torch._scaled_mm(
        qx, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16
    )
    return out if dtype == torch.bfloat16 else out.to(dtype)


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, serialized: bool, activation_scheme: str, ignored_layers: list[str]) -> None:
        self.serialized = serialized
        self.activation_scheme = activation_scheme
        self.ignored_layers = ignored_layers

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        serialized = config.get("quant_method") == "fp8"
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"quantization_config.activation_scheme={scheme!r} is not supported: use one of {ACTIVATION_SCHEMES}"
            )
        if config.get("weight_block_size") is not None:
            raise ValueError(
                f"quantization_config.weight_block_size={config['weight_block_size']}: block-wise fp8 checkpoints "
                "are not supported yet; supported: per-tensor or per-channel weight scales (no weight_block_size)"
            )
        if not serialized and scheme == "static":
            raise ValueError(
                "quantization_config.activation_scheme='static' needs an fp8 checkpoint with input scales; "
                "quantizing at load (--quantization fp8) supports 'dynamic' only"
            )
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert") or []
        return cls(serialized, scheme, list(ignored))

    def linear_method(self, prefix: str) -> LinearMethod:
        if all_parts_match(self.ignored_layers, prefix, self, "ignored_layers"):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(self.serialized, static_input=self.activation_scheme == "static")

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cuda" and not fp8_gemm_supported(device):
            logger.warning(
                "quantization='fp8' on a GPU of compute capability %s (< 8.9, no FP8 tensor cores): the fp8 "
                "weights are dequantized for each matmul (weight-only; slower than unquantized)",
                ".".join(map(str, torch.cuda.get_device_capability(device))),
            )

    @property
    def quantizes_checkpoint(self) -> bool:
        return self.serialized

    def weight_bytes(self, num_weights: int, dtype: torch.dtype) -> int:
        return num_weights  # one byte each; the scales are a row's or a tensor's few bytes
