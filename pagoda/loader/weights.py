"""Checkpoint tensors of a local Hugging Face model directory, streamed one file at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pagoda.loader.cache_dir import pagoda_cache_dir, write_text_atomically

logger = logging.getLogger(__name__)


def iter_checkpoint_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from the directory's *.safetensors files (the shards its index lists, when
    it has one), else from its pytorch_model*.bin files.

    Only one file is open at a time, so peak memory is about one shard. Raises FileNotFoundError at
    once, not on first iteration, when the directory holds neither.
    """
    model_dir = Path(model_dir)
    if safetensors := _safetensors_files(model_dir):
        return _iter_safetensors(safetensors)
    if bins := sorted(model_dir.glob("pytorch_model*.bin")):
        return _iter_bins(bins)
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {model_dir}")


def read_checkpoint_tensors(model_dir: str | Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Those of `names` the checkpoint has, reading only them from safetensors files."""
    model_dir = Path(model_dir)
    if not (files := _safetensors_files(model_dir)):
        return {name: tensor for name, tensor in iter_checkpoint_weights(model_dir) if name in names}
    found = {}
    for path in files:
        with open_safetensors(path) as f:
            found.update((name, f.get_tensor(name)) for name in names & set(f.keys()))
    return found


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return sorted(model_dir.glob("*.safetensors"))


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with open_safetensors(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open on the CPU; a file that is not a whole safetensors file (cut short: its header
    names more bytes than it has) raises a ValueError naming it and its size."""
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a whole safetensors file ({path.stat().st_size:,} bytes; cut short or damaged): {error}"
        ) from error
    with handle as f:
        yield f


def _iter_bins(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        # weights_only: unpickling a checkpoint must never run code from it.
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def hf_checkpoint_shapes(hf_config: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The names and shapes of a checkpoint of this config (its values, as `to_dict` gives them).
    They come from transformers' model of the config, whose modeling code takes ~3 s to import (a
    third of `pagoda serve`'s start with random weights on a GPU host), so they are kept on disk,
    one file per config and transformers version: a later start reads them."""
    path = _shapes_file(hf_config)
    if path is not None:
        with contextlib.suppress(OSError, ValueError, TypeError):  # none yet, or not a list of [name, shape]
            return tuple((str(name), tuple(int(n) for n in shape)) for name, shape in json.loads(path.read_text()))
    shapes = tuple((name, tuple(p.shape)) for name, p in hf_meta_model(hf_config).named_parameters())
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(shapes))
        except OSError as error:  # an unwritable cache only costs the next start the time it saves
            logger.warning("random weights' checkpoint shapes not kept in %s: %s", path.parent, error)
    return shapes


def _shapes_file(hf_config: dict[str, Any]) -> Path | None:
    """Where hf_checkpoint_shapes keeps this config's shapes (None: transformers' version unknown)."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:  # run from a source tree: its models may change unversioned
        return None
    key = json.dumps([version, hf_config], sort_keys=True, default=str)
    return pagoda_cache_dir() / "checkpoint_shapes" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def hf_meta_model(hf_config: dict[str, Any]) -> torch.nn.Module:
    """The Hugging Face model for a config (its values, as `to_dict` gives them) without storage:
    its parameter names and shapes are those of a checkpoint."""
    from transformers import (
        AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification,
    )
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.for_model(**hf_config)
    if "vision_config" in hf_config:
        auto = AutoModelForImageTextToText
    elif type(config) in MODEL_MAPPING and MODEL_MAPPING[type(config)].__name__ in (config.architectures or ()):
        auto = AutoModel  # the checkpoint is the bare model, with no head (BertModel: an embedding model)
    elif any(arch.endswith("ForSequenceClassification") for arch in config.architectures or ()):
        auto = AutoModelForSequenceClassification  # a cross-encoder
    else:
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)
