"""A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, or PEFT's older
adapter_model.bin) read into per-module
A/B pairs, the scaling folded into B, and checked against the base model: what this engine cannot
apply is refused with a message naming it, before any request runs with it."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pagoda.config.model_spec import ModelSpec
from pagoda.models.llama import is_sparse_layer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # older PEFT releases', read with weights_only

# A checkpoint module of a decoder layer -> its Pagoda layer (under the decoder layer) and its
# part of that layer (the fused qkv_proj and gate_up_proj hold several), None: the whole layer.
TARGETS: dict[str, tuple[str, str | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q_proj"),
    "k_proj": ("self_attn.qkv_proj", "k_proj"),
    "v_proj": ("self_attn.qkv_proj", "v_proj"),
    "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", "gate_proj"),
    "up_proj": ("mlp.gate_up_proj", "up_proj"),
    "down_proj": ("mlp.down_proj", None),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoRAWeights:
    """One target module's update: out += x @ a.T @ b.T (b already scaled)."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]


@dataclass
class PeftAdapter:
    path: str
    rank: int
    modules: dict[tuple[int, str], LoRAWeights]  # (layer index, target module) -> its update


def load_peft_adapter(path: str, max_rank: int) -> PeftAdapter:
    """Read an adapter's files; ValueError for anything this engine cannot apply."""
    folder = Path(path)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    rank = int(config.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise ValueError(f"LoRA adapter {path!r} has rank {rank}, above max_lora_rank={max_rank} (--max-lora-rank)"
                         if rank > max_rank else f"LoRA adapter {path!r} has rank {rank}: must be >= 1")
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in TARGETS:
            raise ValueError(f"LoRA adapter {path!r} targets {key!r}, a module this engine cannot apply LoRA to "
                             f"(supported: {', '.join(TARGETS)})")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {path!r} has no lora_A/lora_B weights")
    modules = {}
    for (layer, target), ab in sorted(pairs.items()):
        missing = {"A", "B"} - set(ab)
        if missing:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer}'s {target} has no lora_{missing.pop()}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer}'s {target} has lora_A {tuple(a.shape)} and "
                             f"lora_B {tuple(b.shape)}, not rank {rank}")
        modules[layer, target] = LoRAWeights(a.float(), b.float() * scale)
    return PeftAdapter(str(path), rank, modules)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(str(folder / WEIGHTS_FILE))
    if (folder / PICKLED_WEIGHTS_FILE).is_file():
        return torch.load(folder / PICKLED_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {str(folder)!r} has no {WEIGHTS_FILE} (nor {PICKLED_WEIGHTS_FILE})")


def _read_config(folder: Path) -> dict:
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter {str(folder)!r} has no {CONFIG_FILE}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {str(folder)!r} is a {config['peft_type']} adapter, not LORA")
    unsupported = {
        "modules_to_save": "modules_to_save (whole modules trained beside the adapter) is not supported",
        "use_dora": "DoRA (use_dora) is not supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    }
    for field, why in unsupported.items():
        if config.get(field):
            raise ValueError(f"LoRA adapter {str(folder)!r}: {why}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {str(folder)!r}: bias={config['bias']!r} is not supported, only 'none'")
    return config


def check_adapter(adapter: PeftAdapter, spec: ModelSpec) -> None:
    """ValueError unless every module the adapter targets exists in the model with its shapes."""
    shapes = module_shapes(spec)
    for (layer, target), weights in adapter.modules.items():
        where = f"LoRA adapter {adapter.path!r}: layer {layer}'s {target}"
        if layer >= spec.num_hidden_layers:
            raise ValueError(f"{where} is not in the model, which has {spec.num_hidden_layers} layers")
        if target in ("gate_proj", "up_proj", "down_proj") and is_sparse_layer(spec, layer):
            raise ValueError(f"{where} is not in the model: that layer's MLP is a mixture of experts")
        in_features, out_features = shapes[target]
        if weights.a.shape[1] != in_features or weights.b.shape[0] != out_features:
            raise ValueError(
                f"{where} maps {weights.a.shape[1]} -> {weights.b.shape[0]} features, but the base model's "
                f"maps {in_features} -> {out_features}: the adapter was trained for another model"
            )


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module, unsharded."""
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }

