"""What the GGUF quantized path derives from a GGUF file, cached under $PAGODA_CACHE_DIR/gguf
(default ~/.cache/pagoda/gguf) so that a later start reads it directly instead of parsing the file
(its ~100,000 tokenizer strings), building transformers' tensor-name map and unpacking every block:

- the file's quantization config (gguf_loader.gguf_quantization_config: each module's GGUF type and
  the tensor names' map), which the front end reads, as JSON;
- the weights as the loader hands them to a model whose GGUF method keeps `kept_modules`
  quantized (their blocks unpacked, two 4-bit values a byte here; every other tensor dequantized
  to float32), in safetensors shards, written whole or not at all (atomic_dir).

The unpacked blocks are cached rather than the kernel's repacked int4 layout: they are sliced for
packed and tensor-parallel layers as loaded, and the repacking (under 0.1 s for the default model)
depends on the CPU's vector width. An entry is keyed by the file's identity (its resolved path,
size and modification time) and this cache's format version; entries of an older state of the
same path are removed when a new one is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pagoda.loader.atomic_dir import directory_problem, write_directory_atomically
from pagoda.loader.cache_dir import pagoda_cache_dir, write_text_atomically
from pagoda.loader.gguf_loader import gguf_quantization_config, iter_gguf_weights
from pagoda.loader.weights import iter_checkpoint_weights

logger = logging.getLogger(__name__)

# Part of every key: bump it when what is cached, or its form, changes.
_CACHE_VERSION = 1
_QUANTIZATION_FILE = "quantization_config.json"
# Tensors per safetensors shard, by bytes: writing holds one shard in memory.
_SHARD_BYTES = 512 << 20
_QWEIGHT = ".qweight"


def cached_gguf_quantization_config(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """gguf_quantization_config(path, config), from the cache when this state of the file has an entry."""
    cached = _entry(Path(path)) / _QUANTIZATION_FILE
    with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: read the file
        return json.loads(cached.read_text())
    quantization = gguf_quantization_config(path, config)
    try:
        with _locked_entry(Path(path)):
            write_text_atomically(cached, json.dumps(quantization))
    except OSError as error:
        _log_uncached(path, error)
    return quantization


def cached_gguf_weights(
    path: str | Path, config: dict[str, Any], kept_modules: Collection[str], names: dict[str, str] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """iter_gguf_weights(path, config, kept_modules, names), read from the cache; the first load of
    this state of the file (with these kept modules) writes its entry first."""
    path = Path(path)
    kept = sorted(kept_modules)
    directory = _entry(path) / f"weights-{_digest(json.dumps(kept))}"
    if directory_problem(directory) is not None:
        try:
            with _locked_entry(path):  # processes loading together: one writes, the others wait
                if directory_problem(directory) is not None:
                    shutil.rmtree(directory, ignore_errors=True)  # one cut short since it was written
                    with write_directory_atomically(directory) as partial:
                        _write_shards(iter_gguf_weights(path, config, kept, names), partial)
        except OSError as error:
            _log_uncached(path, error)
            return iter_gguf_weights(path, config, kept, names)
    return _read_weights(directory)


def _log_uncached(path: str | Path, error: OSError) -> None:
    """A cache that cannot be written (read-only, full) costs start-up time, not the start."""
    logger.warning("cannot cache what %s gives (%s): it is read from the file at every start "
                   "(PAGODA_CACHE_DIR sets where the cache is)", path, error)


def _write_shards(weights: Iterator[tuple[str, torch.Tensor]], directory: Path) -> None:
    shard: dict[str, torch.Tensor] = {}
    size = count = 0
    for name, tensor in weights:
        if name.endswith(_QWEIGHT):
            tensor = _pack_nibbles(tensor)
        shard[name] = tensor
        size += tensor.nbytes
        if size >= _SHARD_BYTES:
            count = _save_shard(shard, directory, count)
            shard, size = {}, 0
    if shard:
        _save_shard(shard, directory, count)


def _save_shard(shard: dict[str, torch.Tensor], directory: Path, count: int) -> int:
    save_file(shard, directory / f"weights-{count:05d}.safetensors", metadata={"format": "pt"})
    return count + 1


def _read_weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_checkpoint_weights(directory):
        yield name, _unpack_nibbles(tensor) if name.endswith(_QWEIGHT) else tensor


def _pack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> uint8 [N, K/2]: half the disk and read of one value a byte."""
    return qweight[:, 0::2] | (qweight[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _entry(path: Path) -> Path:
    """The cache entry of the file as it is now: <stem>-<path's digest>-<state's digest>."""
    path = path.resolve()
    stat = path.stat()
    state = _digest(f"{_CACHE_VERSION}:{stat.st_size}:{stat.st_mtime_ns}")
    return pagoda_cache_dir() / "gguf" / f"{path.stem}-{_digest(str(path))}-{state}"


@contextlib.contextmanager
def _locked_entry(path: Path) -> Iterator[None]:
    """The file's entry, created and locked; the entries of the path's other states removed."""
    entry = _entry(path)
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name.rpartition('-')[0]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in entry.parent.glob(f"{entry.name.rpartition('-')[0]}-*"):
            if stale != entry:
                shutil.rmtree(stale, ignore_errors=True)
        yield


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
