"""The GGUF quantized path's cache (pagoda/loader/gguf_cache.py): a second load reads the file's
quantization config and weights from the cache, not from the file, and gives what the file gives;
a changed file, or an entry cut short, is read from the file again."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.loader import gguf_cache
from pagoda.loader.gguf_loader import (
    gguf_quantization_config,
    iter_gguf_weights,
    load_gguf_config,
)
from tests.test_gguf import TinyModel, write_tiny_gguf

Q = gguf.GGMLQuantizationType
# Q4_K: the int4 kernel's types (kept quantized); Q8_0: dequantized at load.
TINY = TinyModel(hidden=256, intermediate=512)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _loaded(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The quantization config and the weights the quantized path loads, through the cache."""
    config = load_gguf_config(path).to_dict()
    quantization = gguf_cache.cached_gguf_quantization_config(path, config)
    kept = [module for module, kind in quantization["tensor_types"].items() if kind == "Q4_K"]
    weights = dict(gguf_cache.cached_gguf_weights(path, config, kept, quantization["tensor_names"]))
    return quantization, weights


def _from_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = load_gguf_config(path).to_dict()
    quantization = gguf_quantization_config(path, config)
    kept = [module for module, kind in quantization["tensor_types"].items() if kind == "Q4_K"]
    return quantization, dict(iter_gguf_weights(path, config, kept, quantization["tensor_names"]))


def _assert_same(got: tuple[dict, dict[str, torch.Tensor]], expected: tuple[dict, dict[str, torch.Tensor]]) -> None:
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys()
    for name, tensor in expected[1].items():
        torch.testing.assert_close(got[1][name], tensor, rtol=0, atol=0, msg=name)


def _not_from_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("read from the GGUF file although its cache entry is whole")

    monkeypatch.setattr(gguf_cache, "gguf_quantization_config", refuse)
    monkeypatch.setattr(gguf_cache, "iter_gguf_weights", refuse)


def test_second_load_reads_the_cache_and_equals_the_file(tmp_path, monkeypatch, cache_dir):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TINY, Q.Q4_K)
    first = _loaded(path)
    assert any(name.endswith(".qweight") for name in first[1])  # kept layers' blocks, unpacked
    _assert_same(first, _from_file(path))
    _not_from_the_file(monkeypatch)
    _assert_same(_loaded(path), first)
    assert len(list(cache_dir.glob("tiny-*"))) == 1


def test_a_changed_file_is_read_again_and_its_old_entry_removed(tmp_path, cache_dir):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TINY, Q.Q4_K, seed=0)
    before = _loaded(path)
    write_tiny_gguf(path, TINY, Q.Q4_K, seed=1)  # same size, other blocks
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a coarse clock may give the same mtime
    after = _loaded(path)
    _assert_same(after, _from_file(path))
    assert not torch.equal(after[1]["model.layers.0.mlp.down_proj.qweight"],
                           before[1]["model.layers.0.mlp.down_proj.qweight"])
    assert len(list(cache_dir.glob("tiny-*"))) == 1


def test_an_entry_cut_short_is_written_again(tmp_path, cache_dir):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TINY, Q.Q4_K)
    first = _loaded(path)
    (shard,) = cache_dir.glob("*/weights-*/*.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    _assert_same(_loaded(path), first)


def _greedy(path: Path) -> list[list[int]]:
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=128)
    try:
        outputs = llm.generate([{"prompt_token_ids": [5, 80, 13, 200, 7]}, {"prompt_token_ids": [42, 42, 9]}],
                               SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    finally:
        llm.shutdown()
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_engine_started_again_loads_from_the_cache_with_the_same_tokens(tmp_path, monkeypatch, cache_dir):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TINY, Q.Q4_K)
    first = _greedy(path)
    assert list(cache_dir.glob("*/weights-*"))
    _not_from_the_file(monkeypatch)
    assert _greedy(path) == first


def test_a_cache_that_cannot_be_written_reads_the_file(tmp_path, monkeypatch, caplog):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TINY, Q.Q4_K)
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "not-a-dir"))
    _assert_same(_loaded(path), _from_file(path))
    assert "cannot cache what" in caplog.text
