"""GGUF checkpoints (`--quantization gguf`, chosen by itself for a GGUF model as in vLLM): on the
CPU their quantized linear layers stay quantized and run through weight-only kernels;
on a GPU every weight is dequantized to the model's dtype at load.

The GGUF loader hands a kept layer its blocks unpacked (pagoda/loader/gguf_blocks.py) under the
parameter names created here, so packed (q|k|v, gate|up) and tensor-parallel layers slice them
like any checkpoint tensor; `process_weights_after_loading` repacks them for the kernel:
- Q4_0, Q4_1, Q4_K: the int4 matmul (pagoda/quantization/int4pack.py, shared with the W4A16
  formats: Pagoda's C one where the CPU has AVX512-VNNI or AVX2, else torch's, in bfloat16), groups of 32
  with a scale and a zero each (W = (q - 8) * scale + zero, which maps every 4-bit type). A packed
  layer whose parts mix these types is one int4 layer.
- Q8_0 embeddings and LM heads: their float32 values turned back into Q8_0's form after loading,
  exactly (pagoda/layers/q8_rows.py; `process_model_after_loading`).
Other types are dequantized to the model's dtype, as are other embeddings and LM heads and packed
layers with a part of another type. Q8_0 projections among them: `aten._weight_int8pack_mm` takes
one scale per output row, and requantizing Q8_0's one per 32 values to it moves the default
model's Q8_0 tensor by 1.2 % (its logits' argmax changes for 2 % of random hidden states), so
greedy tokens would."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pagoda.layers.linear import LinearMethod, UnquantizedLinearMethod, VocabParallelEmbedding, sliced_param
from pagoda.layers.lm_head_screen import ScreenedHead
from pagoda.layers.q8_rows import Q8Rows
from pagoda.loader.gguf_blocks import GROUP, INT4_TYPES
from pagoda.quantization.base import QuantizationConfig
from pagoda.quantization.int4pack import Int4Pack, NativeInt4, c_int4_weight, int4_weight

logger = logging.getLogger(__name__)


class GGUFInt4LinearMethod(LinearMethod):
    """Q4_0/Q4_1/Q4_K: qweight uint8 [N, K] (0..15), scales and zeros [N, K/32]."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        if not Int4Pack.fits(output_size, input_size, GROUP, torch.device("cpu"), torch.get_default_dtype()):
            raise ValueError(
                f"GGUF: a layer of {output_size} x {input_size} features (per rank) does not fit the CPU int4 kernel "
                f"(inputs a multiple of {GROUP}, outputs of 16)"
            )
        layer.qweight = sliced_param(torch.empty(output_size, input_size, dtype=torch.uint8), output_dim=0, input_dim=1)
        for name in ("scales", "zeros"):  # one per output row and 32 inputs, sliced as the weight is
            setattr(layer, name, sliced_param(
                torch.empty(output_size, input_size // GROUP, dtype=torch.float32),
                output_dim=0, input_dim=1, input_divisor=GROUP,
            ))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.int4 = int4_weight(layer.qweight.data, layer.scales.data, layer.zeros.data, GROUP)
        del layer.qweight, layer.scales, layer.zeros

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.int4.linear(x, bias)

    def c_int4_weight(self, layer: nn.Module) -> NativeInt4 | None:
        return c_int4_weight(layer)


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

    def process_model_after_loading(self, model: nn.Module) -> None:
        """On the CPU, an embedding or LM head whose GGUF tensor is Q8_0 keeps its rows in that form
        and lets the float32 weight go (layers/q8_rows.py: the default model's 113 MB -> 31 MB); a
        tied pair shares them. One rank only, and where the LM head's screen serves the weight."""
        tied = model.tied_parameters()
        held: dict[str, Q8Rows | None] = {}
        for path, module in model.named_modules():
            if not isinstance(module, VocabParallelEmbedding) or module.tp.size != 1:
                continue
            source = tied.get(f"{path}.weight", f"{path}.weight").rpartition(".")[0]
            if self.tensor_types.get(source) != "Q8_0":
                continue
            if source not in held:  # a tied pair's weight is checked once
                held[source] = None
                if ScreenedHead.serves(module.weight):
                    held[source] = Q8Rows.lossless(module.weight)
                    logger.info("GGUF: %s %s in Q8_0", source, "kept" if held[source] is not None else "not kept (inexact)")
            if held[source] is not None:
                module.hold_q8(held[source])

    def _log_dequantized(self) -> None:
        if not self._logged_dequantized:
            logger.info("GGUF: the quantized weights are dequantized at load on this device (kept quantized on the CPU)")
            self._logged_dequantized = True
