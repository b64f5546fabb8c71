"""From a resolved model to what the engine runs: its config, tokenizer, and weights on a device."""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pagoda.attention.backend import AttentionBackend
from pagoda.config.engine_config import GENERATION_CONFIG_FIELDS
from pagoda.config.groups import ModelConfig
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.linear import UnquantizedLinearMethod
from pagoda.loader.gguf_cache import (
    cached_gguf_quantization_config,
    cached_gguf_weights,
)
from pagoda.loader.gguf_loader import (
    iter_gguf_weights,
    load_gguf_config,
    load_gguf_eos_token_ids,
    load_gguf_tokenizer,
)
from pagoda.loader.model_resolver import ResolvedModel
from pagoda.loader.weight_loader import load_weights, parameter_name
from pagoda.loader.weights import hf_checkpoint_shapes, iter_checkpoint_weights
from pagoda.models import model_class
from pagoda.models.interface import CausalLM
from pagoda.quantization import get_quantization_config
from pagoda.quantization.base import QuantizationConfig
from pagoda.quantization.gguf import GGUFConfig

logger = logging.getLogger(__name__)

# Dummy weights: small uniform values keep activations finite through any depth.
_DUMMY_RANGE = 1e-3
_U64 = 2**64 - 1


def load_hf_config(resolved: ResolvedModel) -> Any:
    """The model's Hugging Face config, with its hf_overrides set."""
    config = _read_hf_config(resolved)
    if resolved.hf_overrides:
        _override(config, resolved.hf_overrides)
        logger.info("model config fields overridden (hf_overrides): %s", resolved.hf_overrides)
    return config


def _override(config: Any, overrides: dict[str, Any]) -> None:
    """vLLM's hf_overrides: each key set, whether or not the config had it; a nested config (a
    vision-language model's text_config) updated key by key rather than replaced."""
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        nested = getattr(config, key, None)
        if isinstance(nested, PretrainedConfig) and isinstance(value, dict):
            _override(nested, value)
        else:
            setattr(config, key, value)
        # transformers 5 reads rope_theta from rope_parameters alone (its rope_scaling setter
        # updates them itself): a top-level override, as vLLM users write it, goes there too.
        if key == "rope_theta" and isinstance(getattr(config, "rope_parameters", None), dict):
            config.rope_parameters = {**config.rope_parameters, "rope_theta": value}


def _read_hf_config(resolved: ResolvedModel) -> Any:
    if resolved.gguf_file is not None:
        return load_gguf_config(resolved.gguf_file)
    from transformers import AutoConfig

    path = resolved.model_dir / "config.json"
    _check_json(path)
    try:
        return AutoConfig.from_pretrained(
            str(resolved.model_dir), local_files_only=True, trust_remote_code=resolved.trust_remote_code
        )
    except (OSError, ValueError) as error:  # no config.json, or one transformers cannot use
        hint = " (pass trust_remote_code=True, --trust-remote-code, to run it)" if "custom code" in str(error) else ""
        raise ValueError(f"cannot load the model config {path}: {error}{hint}") from error


def _check_json(path: Path) -> None:
    """A JSON file that does not parse raises a ValueError naming it and where it goes wrong
    (transformers' error for a bad config.json is taken for a missing tokenizer, or names no place)."""
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return  # transformers says what a missing file means for the model
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def load_tokenizer(resolved: ResolvedModel, tokenizer: str | None = None, mode: str = "auto") -> Any:
    """The model's tokenizer (or the one in `tokenizer`); mode: tokenizer_mode, 'slow' for the
    slow (Python) tokenizer, a ValueError where transformers gives a fast one only."""
    loaded = _load_tokenizer(resolved, tokenizer, use_fast=mode != "slow")
    if mode == "slow" and loaded.is_fast:
        # transformers 5 ignores use_fast: a slow tokenizer is only had where the model's class is one.
        raise ValueError(
            f"tokenizer_mode='slow': {tokenizer or resolved.name} has no slow (Python) tokenizer that transformers "
            f"loads (it gives the fast {type(loaded).__name__}): use tokenizer_mode='auto'"
        )
    return loaded


def _load_tokenizer(resolved: ResolvedModel, tokenizer: str | None, use_fast: bool) -> Any:
    from transformers import AutoTokenizer

    if resolved.gguf_file is not None and tokenizer is None:
        return load_gguf_tokenizer(resolved.gguf_file)
    source = tokenizer if tokenizer is not None else str(resolved.model_dir)
    if Path(source).is_dir():
        _check_json(Path(source) / "config.json")  # the tokenizer's class may be read from it
    try:
        return AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=resolved.trust_remote_code, use_fast=use_fast
        )
    except (OSError, ValueError) as error:
        # transformers' message for a folder with no tokenizer files speaks of slow tokenizers,
        # sentencepiece and tiktoken; say what the user can do instead.
        raise ValueError(
            f"no usable tokenizer in {source}: pass tokenizer=... (--tokenizer) with a folder or "
            "cached model id that has one, or "
            "skip_tokenizer_init=True (--skip-tokenizer-init) to work on token ids only"
        ) from error


def _generation_config(directory: str | Path) -> Any | None:
    """The GenerationConfig of a generation_config.json in `directory`; None without one. One that
    does not load is an error naming the file: its EOS ids and defaults must not vanish silently."""
    from transformers import GenerationConfig

    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a valid generation config: {cause}") from None


def load_generation_eos(resolved: ResolvedModel) -> set[int]:
    """EOS ids from generation_config.json (Llama 3 lists several) or the GGUF metadata."""
    if resolved.gguf_file is not None:
        return load_gguf_eos_token_ids(resolved.gguf_file)
    gen = _generation_config(resolved.model_dir)
    eos = None if gen is None else gen.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def load_generation_defaults(directory: str | Path) -> dict[str, Any]:
    """The default sampling parameters a generation_config.json in `directory` sets (the fields
    that differ from transformers' defaults), by SamplingParams name; {} when there is none."""
    gen = _generation_config(directory)
    if gen is None:
        return {}
    diff = gen.to_diff_dict()
    return {ours: diff[theirs] for theirs, ours in GENERATION_CONFIG_FIELDS.items() if diff.get(theirs) is not None}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    model: ModelConfig,
    *,
    device: torch.device,
    backend: AttentionBackend,
    quant_config: QuantizationConfig | None = None,
) -> CausalLM:
    """The model, its weights loaded, on `device`. quant_config: what gives each linear layer its
    method (default: the config's quantization method, read from the checkpoint)."""
    model_cls = model_class(model.spec.architecture)
    if quant_config is None and model.quantization is not None:
        quant_config = get_quantization_config(model.quantization, model.spec.quantization)
    with _default_dtype(model.dtype), device:
        built = model_cls(model.spec, backend, model.max_model_len, quant_config)
    if model.load_format == "dummy":
        weights = iter_dummy_weights(model.spec, model.seed, model.dtype, device)
        if quant_config is not None and quant_config.quantizes_checkpoint:
            weights = quantized_dummy_weights(built, quant_config, weights)
        load_weights(built, weights)
    else:
        logger.info("loading the weights from %s", model.resolved.weights_gguf or model.resolved.model_dir)
        if built.loads_own_checkpoint:
            built.load_checkpoint(model.resolved.model_dir)
        else:
            load_weights(built, _iter_weights(model.resolved, model.spec, quant_config))
    if quant_config is not None:
        quant_config.process_model_after_loading(built)
    return built.eval()


def quantized_dummy_weights(
    model: CausalLM, quant_config: QuantizationConfig, weights: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dummy weights as a quantized checkpoint holds them: each weight of a linear layer that the
    config quantizes rounded to the nearest of its format's levels (`quantize_dummy_weight`); the
    rest, and the layers it leaves unquantized, as they come. So a quantized model's config alone
    (a quantization_config in config.json) runs with random weights, as an unquantized one does."""
    quantized = {
        module for prefix, layer in model.named_modules()
        if not isinstance(getattr(layer, "linear_method", None), (type(None), UnquantizedLinearMethod))
        for module in quant_config.checkpoint_modules(prefix)
    }
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and parameter_name(model, name).rpartition(".")[0] in quantized:
            for part, value in quant_config.quantize_dummy_weight(tensor).items():
                yield f"{module}.{part}", value
        else:
            yield name, tensor


def _iter_weights(
    resolved: ResolvedModel, spec: ModelSpec, quant_config: QuantizationConfig | None
) -> Iterator[tuple[str, torch.Tensor]]:
    if resolved.weights_gguf is not None:
        if not isinstance(quant_config, GGUFConfig):
            return iter_gguf_weights(resolved.weights_gguf, spec.hf_config)
        if quant_config.kept_modules:  # the CPU's quantized path, whose unpacked blocks are cached
            return cached_gguf_weights(
                resolved.weights_gguf, spec.hf_config, quant_config.kept_modules, quant_config.tensor_names
            )
        return iter_gguf_weights(resolved.weights_gguf, spec.hf_config, (), quant_config.tensor_names)
    return iter_checkpoint_weights(resolved.model_dir)


def gguf_checkpoint_quantization(resolved: ResolvedModel, spec: ModelSpec) -> dict[str, Any] | None:
    """The quantization_config of a model whose weights come from a GGUF file (None otherwise)."""
    if resolved.weights_gguf is None:
        return None
    return cached_gguf_quantization_config(resolved.weights_gguf, spec.hf_config)


def iter_dummy_weights(
    spec: ModelSpec, seed: int, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights as a checkpoint: whole tensors under Hugging Face names, each drawn from a
    seed of its own name. Every rank of a sharded model loads its slices of the very tensors that
    one unsharded rank loads, so a random model gives the same tokens at any TP and PP size."""
    # Read here, in the engine core, rather than by the front end: the transformers model that
    # gives the names and shapes imports most of transformers (~3 s), the first time a config runs.
    for name, shape in spec.checkpoint_shapes or hf_checkpoint_shapes(spec.hf_config):
        generator = torch.Generator(device=device).manual_seed(((seed << 32) + zlib.crc32(name.encode())) & _U64)
        tensor = torch.empty(shape, dtype=dtype, device=device)
        yield name, tensor.uniform_(-_DUMMY_RANGE, _DUMMY_RANGE, generator=generator)
