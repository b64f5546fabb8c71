"""Where a model's files are: the embedded default model, a local directory or GGUF file, or a
model id already in the Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ResolvedModel:
    model_dir: Path
    gguf_file: Path | None  # set when the weights (and config, tokenizer) come from a GGUF file
    name: str  # for display
    # The default model: its weights from this GGUF file (kept quantized on the CPU), its config and
    # tokenizer from model_dir (read from the GGUF file they take seconds).
    gguf_weights_file: Path | None = None
    # vLLM's trust_remote_code: a config, tokenizer or processor class the model's folder defines in
    # its own Python files may be run (its architecture must still be one Pagoda or transformers has).
    trust_remote_code: bool = False
    # vLLM's hf_overrides: fields set on the model's config when it is read (loader/model_loader.py's
    # load_hf_config), so that every reader of the config sees them.
    hf_overrides: dict[str, Any] | None = None

    @property
    def weights_gguf(self) -> Path | None:
        """The GGUF file the weights come from, if any."""
        return self.gguf_file or self.gguf_weights_file


def resolve_model(
    model: str | None, load_format: str = "auto", quantization: str | None = None, trust_remote_code: bool = False,
    hf_overrides: dict[str, Any] | None = None, revision: str | None = None, download_dir: str | None = None,
) -> ResolvedModel:
    """Find `model` on this machine: None is the default model, then a local path, then a Hugging
    Face model id looked up offline in the Hugging Face cache (`download_dir`, else the default
    one), at `revision` (a branch, tag or commit; default main). quantization: the one asked for
    (the default model runs from its GGUF file, kept quantized, unless another is asked for)."""
    resolved = _resolve(model, load_format, quantization, revision, download_dir)
    return dataclasses.replace(resolved, trust_remote_code=trust_remote_code, hf_overrides=hf_overrides)


def resolve_engine_model(config: Any) -> ResolvedModel:
    """resolve_model for an EngineConfig, or the parsed flags of one (the same names)."""
    return resolve_model(
        config.model, config.load_format, config.quantization, config.trust_remote_code, config.hf_overrides,
        config.revision, config.download_dir,
    )


def _resolve(
    model: str | None, load_format: str, quantization: str | None, revision: str | None, download_dir: str | None,
) -> ResolvedModel:
    if model is None:
        return _default_model(load_format, quantization)
    path = Path(model).expanduser()
    if path.is_file():
        return _resolve_file(path, load_format, model)
    if path.is_dir():
        return _resolve_dir(path, load_format, model)
    return _resolve_dir(_from_hf_cache(model, revision, download_dir), load_format, model)


def _default_model(load_format: str, quantization: str | None) -> ResolvedModel:
    from pagoda.loader.default_model import (
        DEFAULT_MODEL,
        default_gguf_path,
        default_model_dir,
    )

    # Asked for as GGUF (e.g. to run llama.cpp on the same file), it is the shipped file itself.
    if load_format == "gguf":
        gguf_file = default_gguf_path()
        return ResolvedModel(gguf_file.parent, gguf_file, DEFAULT_MODEL)
    # Its weights come from the shipped GGUF file, kept quantized on the CPU (the GGUF method, as
    # for any GGUF model); load_format='safetensors' (or another quantization) reads the converted
    # directory's float32 weights instead.
    weights = default_gguf_path() if load_format == "auto" and quantization in (None, "gguf") else None
    return ResolvedModel(default_model_dir(), None, DEFAULT_MODEL, gguf_weights_file=weights)


def _resolve_file(path: Path, load_format: str, name: str) -> ResolvedModel:
    if path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf file: pass a model directory or a .gguf file")
    return _gguf(path, load_format, name)


def _resolve_dir(path: Path, load_format: str, name: str) -> ResolvedModel:
    ggufs = sorted(path.glob("*.gguf"))
    is_gguf = load_format == "gguf" or (len(ggufs) == 1 and not (path / "config.json").exists())
    if not is_gguf:
        return ResolvedModel(path, None, name)
    if len(ggufs) != 1:
        found = ", ".join(p.name for p in ggufs) or "none"
        raise ValueError(f"{path} must hold exactly one .gguf file to load (found: {found}): pass the file's path")
    return _gguf(ggufs[0], load_format, name)


def _gguf(path: Path, load_format: str, name: str) -> ResolvedModel:
    if load_format in ("safetensors", "pt"):
        raise ValueError(f"{path} is a GGUF model, which load_format={load_format!r} cannot load: use 'auto' or 'gguf'")
    return ResolvedModel(path.parent, path, name)


def _from_hf_cache(model_id: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"model {model_id!r}{at} is neither a local path nor a model in the Hugging Face cache "
            f"({cache_dir or constants.HF_HUB_CACHE}; --download-dir, HF_HUB_CACHE or HF_HOME look elsewhere). Pagoda never "
            "downloads models: pass a local directory or .gguf file, or download the model into the cache first"
        ) from e
