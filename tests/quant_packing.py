"""Reference packers for quantized test checkpoints: take a tiny random Hugging Face checkpoint
(tests/tiny_models.py) and write it again with its attention and MLP projections quantized in a
format's own layout, plus a "reference" copy whose projections are the dequantized weights in
float32 (what a quantized model must behave like). Written from the formats' documented layouts
(Hugging Face fp8 as vLLM / AutoFP8 read it) or by the compressed-tensors library itself (its
quantization parameters, compressors and decompressors)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The projections a dense Llama-family layer quantizes (not MoE experts, not the router).
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")

# weight [out, in] -> (checkpoint tensors by suffix under the module, the dequantized weight)
Packer = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def fp8_per_tensor(w: torch.Tensor, input_scale: float | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Hugging Face fp8 (quant_method "fp8"): fp8 weight, a scalar weight_scale (and input_scale)."""
    scale = w.abs().max().float() / FP8_MAX
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    tensors = {"weight": q, "weight_scale": scale.reshape(())}
    if input_scale is not None:
        tensors["input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    return tensors, q.float() * scale


def fp8_per_channel(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors float-quantized, strategy channel: weight_scale [out, 1]."""
    scale = w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def fp8_dequantized_per_channel(w: torch.Tensor) -> torch.Tensor:
    """What quantizing at load (--quantization fp8) makes of a weight, dequantized."""
    return fp8_per_channel(w)[1]


def pack_checkpoint(
    src: Path, dst: Path, pack: Packer, quantization_config: dict, skip: tuple[str, ...] = ()
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write `src` quantized by `pack` to `dst` (projections whose module ends with one of `skip`
    stay as they are), and its dequantized twin to `dst`-reference. Returns (the reference's
    path, the dequantized weight of each quantized projection by checkpoint name)."""
    tensors = load_file(src / "model.safetensors")
    packed, reference, dequantized = {}, {}, {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if not _PROJECTION.match(name) or module.endswith(skip):
            packed[name] = reference[name] = tensor
            continue
        parts, deq = pack(tensor)
        packed.update({f"{module}.{suffix}": t.contiguous() for suffix, t in parts.items()})
        reference[name] = dequantized[name] = deq
    ref = dst.with_name(dst.name + "-reference")
    for out, weights in ((dst, packed), (ref, reference)):
        shutil.copytree(src, out)
        save_file(weights, out / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return ref, dequantized


def ct_packer(weights: dict, input_activations: dict | None, input_scale: bool = False) -> Packer:
    """compressed-tensors' own compression of a weight under a scheme (min/max scales, as its
    observers compute them without calibration data), and its own decompression as the reference.
    input_scale: a static activation scale per module (what calibration would write)."""
    from compressed_tensors.compressors import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights),
        input_activations=None if input_activations is None else QuantizationArgs(**input_activations),
    )
    compressor = FloatQuantizationCompressor if weights["type"] == "float" else IntQuantizationCompressor

    def pack(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if weights["strategy"] == "channel":
            low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            low, high = w.min().reshape(1), w.max().reshape(1)
        scale, zero_point = calculate_qparams(low, high, scheme.weights)
        tensors = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
        tensors = {k: v for k, v in tensors.items() if v is not None}
        dequantized = compressor.decompress(dict(tensors), scheme)["weight"].float()
        if input_scale:
            tensors["input_scale"] = (w.abs().max().float() / 50).reshape(1)
        return tensors, dequantized

    return pack


def ct_config(weights: dict, input_activations: dict | None, fmt: str, ignore: list[str] | None = None) -> dict:
    """The quantization_config compressed-tensors writes for one group over every Linear layer."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights),
        input_activations=None if input_activations is None else QuantizationArgs(**input_activations),
    )
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
        ignore=["lm_head", *(ignore or [])],
    )
    return config.model_dump(mode="json")
