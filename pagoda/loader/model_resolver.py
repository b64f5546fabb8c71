"""Where a model's files are: the default model, a local directory or GGUF file, or a model id
already in the Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagoda.config import LOAD_FORMATS


@dataclass
class ResolvedModel:
    model_dir: Path
    gguf_file: Path | None
    name: str


def resolve_model(model: str | None, load_format: str = "auto") -> ResolvedModel:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is invalid: it must be one of {LOAD_FORMATS}")
    if model is None:
        from pagoda.loader.default_model import DEFAULT_MODEL, default_model_dir

        return ResolvedModel(default_model_dir(), None, DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(path.parent, path, path.name)
    if path.is_dir():
        return _resolve_dir(path, load_format, model)
    return ResolvedModel(_from_hf_cache(model), None, model)


def _resolve_dir(path: Path, load_format: str, name: str) -> ResolvedModel:
    ggufs = sorted(path.glob("*.gguf"))
    if load_format == "gguf" or (ggufs and not (path / "config.json").exists()):
        if len(ggufs) != 1:
            raise ValueError(f"{path} holds {len(ggufs)} .gguf files: name the one to load")
        return ResolvedModel(path, ggufs[0], name)
    return ResolvedModel(path, None, name)


def _from_hf_cache(model_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as e:  # the hub raises several kinds for "not cached" and for a bad id
        raise FileNotFoundError(
            f"model {model_id!r} is neither a local path nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); Pagoda never downloads models: pass a local directory, "
            "a .gguf file, or a model id already in the cache"
        ) from e
