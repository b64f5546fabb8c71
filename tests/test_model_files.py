"""Model files that do not load: the default model's cache (written whole, converted again when it
no longer loads, keyed on the GGUF file's content), clear errors naming a bad model file (through
LLM(...) and `pagoda serve`), and LLM()'s progress lines."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from serving import save_tokenizer
from test_gguf import TinyModel, write_tiny_gguf
from tiny_models import save_tiny_model

from pagoda import LLM
from pagoda.loader import atomic_dir, default_model, gguf_loader
from pagoda.loader.atomic_dir import MANIFEST
from pagoda.loader.default_model import DEFAULT_MODEL, default_model_dir

_SUBPROCESS_TIMEOUT_S = 240


@pytest.fixture
def tiny_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default model's cache under tmp_path, over a tiny GGUF file standing in for the shipped
    one (a conversion of it takes a second); returns that GGUF file."""
    path = tmp_path / "pkg" / "model.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, TinyModel())
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: path)
    return path


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cache_entries(cache: Path) -> list[str]:
    """What the cache's models folder holds, lock files aside."""
    return sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock"))


# The default model's cache ------------------------------------------------------------------------


def test_a_cut_short_cache_file_is_converted_again(
    tiny_default_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = default_model_dir()
    weights = first / "model.safetensors"
    _cut_short(weights)  # as a crash or a full disk could leave it
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        llm = LLM(device="cpu", max_model_len=64)  # the default model, from the broken cache
    assert f"the cached default model {first} does not load (model.safetensors is" in caplog.text
    assert "converting it again" in caplog.text
    assert default_model_dir() == first and _cache_entries(tmp_path / "cache") == [first.name]
    with safe_open(weights, framework="pt") as f:
        assert len(list(f.keys())) > 0
    assert llm.generate({"prompt_token_ids": [1, 2, 3]}, use_tqdm=False)[0].outputs[0].token_ids


def test_a_cache_whose_safetensors_header_is_damaged_is_converted_again(tiny_default_model: Path) -> None:
    """Sizes as written, content not: e.g. blocks a crash left zeroed."""
    weights = default_model_dir() / "model.safetensors"
    with open(weights, "r+b") as f:
        f.write(bytes(16))
    default_model_dir()
    with safe_open(weights, framework="pt") as f:
        assert len(list(f.keys())) > 0


def test_the_cache_key_is_the_content_not_the_mtime(tiny_default_model: Path, tmp_path: Path) -> None:
    first = default_model_dir()
    # Another virtual environment installs the same package: a copy of the file, a new mtime.
    copy = tmp_path / "venv2" / "model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny_default_model, copy)
    os.utime(copy, ns=(1, 1))
    assert default_model._cache_key(copy) == default_model._cache_key(tiny_default_model)
    os.utime(tiny_default_model, ns=(10**18, 10**18))
    assert default_model_dir() == first
    # Another release: other bytes within the hashed header.
    data = bytearray(tiny_default_model.read_bytes())
    data[100] ^= 0xFF
    copy.write_bytes(data)
    assert default_model._cache_key(copy) != default_model._cache_key(tiny_default_model)


def test_an_interrupted_conversion_leaves_no_cache(
    tiny_default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save_file = gguf_loader.save_file

    def disk_full(tensors: dict, path: Path, metadata: dict) -> None:
        real_save_file(tensors, path, metadata=metadata)
        _cut_short(Path(path))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_loader, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        default_model_dir()
    assert _cache_entries(tmp_path / "cache") == []  # no directory, partial or final
    monkeypatch.setattr(gguf_loader, "save_file", real_save_file)
    target = default_model_dir()
    assert target.name.startswith(f"{DEFAULT_MODEL}-") and atomic_dir.directory_problem(target) is None


def test_the_cache_reaches_the_disk_before_its_name_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the rename must not find a cache whose data never reached the disk."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = atomic_dir._fsync, os.replace
    monkeypatch.setattr(atomic_dir, "_fsync", lambda path: (events.append(("fsync", path.name)), real_fsync(path)))
    monkeypatch.setattr(atomic_dir.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    out = tmp_path / "out"
    with atomic_dir.write_directory_atomically(out) as partial:
        (partial / "a.bin").write_bytes(b"x" * 10)
        (partial / "b.json").write_text("{}")
    renamed = events.index(("rename", "out"))
    synced = {name for kind, name in events[:renamed] if kind == "fsync"}
    assert {"a.bin", "b.json", MANIFEST, partial.name} <= synced
    assert events[renamed + 1:] == [("fsync", tmp_path.name)]  # the rename itself
    assert atomic_dir.directory_problem(out) is None
    (out / "b.json").write_text("{}  ")
    assert atomic_dir.directory_problem(out) == "b.json is 4 bytes, not the 2 written (cut short or damaged)"


# Bad model files ------------------------------------------------------------------------------------


def _cut_short_safetensors(tmp_path: Path) -> tuple[Path, str]:
    path = save_tiny_model("llama3", tmp_path, vocab_size=save_tokenizer(tmp_path / "llama3"))
    _cut_short(path / "model.safetensors")
    return path, f"{path / 'model.safetensors'} is not a whole safetensors file"


def _invalid_config(tmp_path: Path) -> tuple[Path, str]:
    path = save_tiny_model("llama3", tmp_path, vocab_size=save_tokenizer(tmp_path / "llama3"))
    config = path / "config.json"
    config.write_text(config.read_text()[:-20])
    return path, f"{config} is not valid JSON: Expecting"


def _invalid_generation_config(tmp_path: Path) -> tuple[Path, str]:
    path = save_tiny_model("llama3", tmp_path, vocab_size=save_tokenizer(tmp_path / "llama3"))
    (path / "generation_config.json").write_text('{"eos_token_id": 1,')
    return path, f"{path / 'generation_config.json'} is not a valid generation config"


def _cut_short_gguf(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinyModel())
    _cut_short(path)
    return path, f"{path} is a GGUF file cut short or damaged"


def _gguf_of_64_bytes(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinyModel())
    path.write_bytes(path.read_bytes()[:64])
    return path, f"{path} is a GGUF file cut short or damaged (64 bytes)"


BAD_FILES = [_cut_short_safetensors, _invalid_config, _invalid_generation_config, _cut_short_gguf, _gguf_of_64_bytes]
BAD_FILE_IDS = ["safetensors-cut-short", "config-not-json", "generation-config-not-json", "gguf-cut-short",
                "gguf-64-bytes"]


@pytest.mark.parametrize("bad_file", BAD_FILES, ids=BAD_FILE_IDS)
def test_llm_names_the_bad_model_file(tmp_path: Path, bad_file) -> None:
    model, message = bad_file(tmp_path)
    with pytest.raises(ValueError) as raised:
        LLM(model=str(model), device="cpu", max_model_len=64)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("bad_file", BAD_FILES, ids=BAD_FILE_IDS)
def test_serve_names_the_bad_model_file(tmp_path: Path, bad_file) -> None:
    model, message = bad_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", str(model), "--device", "cpu",
         "--host", "127.0.0.1", "--port", "0", "--max-model-len", "64"],
        capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, done.stderr[-3000:]


# LLM()'s progress lines -----------------------------------------------------------------------------

_TWO_LLMS = """
import logging, sys
from pagoda import LLM
LLM(model=sys.argv[1], device="cpu", max_model_len=64)
print("--- the application configures logging", file=sys.stderr, flush=True)
logging.basicConfig(level=logging.INFO, format="APP %(name)s: %(message)s")
LLM(model=sys.argv[1], device="cpu", max_model_len=64)
"""


def _run_llm_script(model: Path, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _TWO_LLMS, str(model)], capture_output=True, text=True,
        timeout=_SUBPROCESS_TIMEOUT_S, env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "loading the weights from" in line or "engine ready in" in line]


def test_llm_logs_its_progress_once(tmp_path: Path) -> None:
    model = save_tiny_model("llama3", tmp_path, vocab_size=save_tokenizer(tmp_path / "llama3"))
    before, after = _run_llm_script(model).split("--- the application configures logging")
    lines = _progress_lines(before)
    assert len(lines) == 2 and all(line.startswith("INFO ") for line in lines), before[-3000:]
    assert f"pagoda.loader.model_loader: loading the weights from {model}" in lines[0]
    # Once the application has configured logging, its handler prints each line, and only it.
    assert [line.split(":")[0] for line in _progress_lines(after)] == ["APP pagoda.loader.model_loader",
                                                                       "APP pagoda"], after[-3000:]


def test_pagoda_configure_logging_0_keeps_llm_quiet(tmp_path: Path) -> None:
    model = save_tiny_model("llama3", tmp_path, vocab_size=save_tokenizer(tmp_path / "llama3"))
    before, after = _run_llm_script(model, PAGODA_CONFIGURE_LOGGING="0").split("--- the application")
    assert _progress_lines(before) == []
    assert len(_progress_lines(after)) == 2  # the application's own configuration still applies
