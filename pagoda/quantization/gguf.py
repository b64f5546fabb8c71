"""GGUF checkpoints (`--quantization gguf`, chosen by itself for a GGUF model as in vLLM): on the
CPU their quantized linear layers stay quantized and run through PyTorch's weight-only kernels;
on a GPU every weight is dequantized to the model's dtype at load.

The GGUF loader hands a kept layer its blocks unpacked (pagoda/loader/gguf_blocks.py) under the
parameter names created here, so packed (q|k|v, gate|up) and tensor-parallel layers slice them
like any checkpoint tensor; `process_weights_after_loading` repacks them for the kernel:
- Q4_0, Q4_1, Q4_K: `aten._weight_int4pack_mm_for_cpu`, groups of 32 with a scale and a zero
  each (W = (q - 8) * scale + zero, which maps every 4-bit type), in bfloat16 (below). A packed
  layer whose parts mix these types is one int4 layer.
Other types are dequantized to the model's dtype, as are embeddings, LM heads and packed layers
with a part of another type. Q8_0 among them: `aten._weight_int8pack_mm` takes one scale per
output row, and requantizing Q8_0's one per 32 values to it moves the default model's Q8_0 tensor
by 1.2 % (its logits' argmax changes for 2 % of random hidden states), so greedy tokens would."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pagoda.layers.linear import LinearMethod, UnquantizedLinearMethod, sliced_param
from pagoda.loader.gguf_blocks import GROUP, INT4_TYPES
from pagoda.quantization.base import QuantizationConfig

logger = logging.getLogger(__name__)

# The kernel's only vectorised path (AVX-512/AVX2) takes bfloat16 activations and scales; with
# float32 or float16 it runs a scalar loop 20-150x slower than a float32 matmul. The product is
# accumulated in float32 and returned in the model's dtype.
_KERNEL_DTYPE = torch.bfloat16


class GGUFInt4LinearMethod(LinearMethod):
    """Q4_0/Q4_1/Q4_K: qweight uint8 [N, K] (0..15), scales and zeros [N, K/32]."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        if input_size % GROUP:
            raise ValueError(f"GGUF: a layer's {input_size} input features (per rank) are not a multiple of {GROUP}")
        layer.qweight = sliced_param(torch.empty(output_size, input_size, dtype=torch.uint8), output_dim=0, input_dim=1)
        for name in ("scales", "zeros"):  # one per output row and 32 inputs, sliced as the weight is
            setattr(layer, name, sliced_param(
                torch.empty(output_size, input_size // GROUP, dtype=torch.float32),
                output_dim=0, input_dim=1, input_divisor=GROUP,
            ))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.qweight.data.int(), 2)
        # [K/32, N, 2]: each group's scale and zero per output column, as the kernel reads them.
        scales_zeros = torch.stack([layer.scales.data.t(), layer.zeros.data.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
        del layer.qweight, layer.scales, layer.zeros
        layer.int4_weight = nn.Parameter(packed, requires_grad=False)
        layer.int4_scales_zeros = nn.Parameter(scales_zeros, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(_KERNEL_DTYPE).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, layer.int4_weight, GROUP, layer.int4_scales_zeros)
        out = out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


class GGUFConfig(QuantizationConfig):
    """The checkpoint config: {"quant_method": "gguf", "tensor_types": {checkpoint module: GGUF
    type name}, "tensor_names": {GGUF tensor: checkpoint tensor}} (gguf_loader.gguf_quantization_config),
    read from the file."""

    name = "gguf"

    def __init__(self, tensor_types: dict[str, str], tensor_names: dict[str, str] | None = None) -> None:
        self.tensor_types = tensor_types
        self.tensor_names = tensor_names
        self.kept_modules: set[str] = set()  # checkpoint modules whose blocks the loader hands over unpacked
        self._logged_dequantized = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        if "tensor_types" not in config:
            raise ValueError("quantization='gguf' runs GGUF models only: pass a .gguf file (or omit --quantization)")
        return cls(config["tensor_types"], config.get("tensor_names"))

    def linear_method(self, prefix: str) -> LinearMethod:
        modules = self.checkpoint_modules(prefix)
        types = {self.tensor_types.get(module) for module in modules}
        if torch.get_default_device().type != "cpu":  # build_model builds under its device
            self._log_dequantized()
            return UnquantizedLinearMethod()
        if not types <= INT4_TYPES:
            return UnquantizedLinearMethod()
        self.kept_modules.update(modules)
        return GGUFInt4LinearMethod()

    def _log_dequantized(self) -> None:
        if not self._logged_dequantized:
            logger.info("GGUF: the quantized weights are dequantized at load on this device (kept quantized on the CPU)")
            self._logged_dequantized = True
