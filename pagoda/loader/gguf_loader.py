"""GGUF files in Hugging Face form: config, tokenizer (with its chat template) and weights.

transformers already knows GGUF's metadata, tokenizer and tensor-name mapping (including the
inverse of llama.cpp's Q/K permutation), and gguf dequantizes every type it supports; this
module only puts the two together."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def load_gguf_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if not getattr(config, "architectures", None):
        config.architectures = [_ARCHITECTURES.get(config.model_type, config.model_type)]
    return config


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def load_gguf_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def iter_gguf_weights(path: str | Path, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor dequantized to float32, under its Hugging Face name."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps names against a model instance; one on the meta device costs nothing.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    for name, tensor in tensors.items():
        yield name, torch.as_tensor(tensor).float()


def convert_gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a self-contained Hugging Face directory (config, generation config, float32
    safetensors, tokenizer with chat template); it appears whole or not at all."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        config = load_gguf_config(gguf_path)
        config.save_pretrained(tmp)
        _write_generation_config(config, tmp)
        weights = {name: t.contiguous() for name, t in iter_gguf_weights(gguf_path, config)}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        load_gguf_tokenizer(gguf_path).save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_generation_config(config: Any, directory: Path) -> None:
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
