"""Random LoRA adapters in PEFT's format for a model, for benchmarks (`pagoda bench throughput
--num-loras N --lora-rank R`): every layer's q/k/v/o and gate/up/down (attention only in an MoE
layer), small random A and B, written to a folder each."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagoda.config.model_spec import ModelSpec
from pagoda.lora.peft import CONFIG_FILE, TARGETS, WEIGHTS_FILE, module_shapes
from pagoda.models.llama import is_sparse_layer

_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def write_random_adapters(spec: ModelSpec, directory: Path, num: int, rank: int, seed: int = 0) -> list[Path]:
    shapes = module_shapes(spec)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(num):
        tensors = {}
        for layer in range(spec.num_hidden_layers):
            for target, (path, _) in TARGETS.items():
                if target in _MLP_TARGETS and is_sparse_layer(spec, layer):
                    continue
                in_features, out_features = shapes[target]
                key = f"base_model.model.model.layers.{layer}.{path.split('.')[0]}.{target}"
                tensors[f"{key}.lora_A.weight"] = _random((rank, in_features), generator)
                tensors[f"{key}.lora_B.weight"] = _random((out_features, rank), generator)
        folder = directory / f"lora-{i}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / WEIGHTS_FILE))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        paths.append(folder)
    return paths


def _random(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.01).to(torch.float16)
