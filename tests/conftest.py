"""Fixtures shared across test files; each owner prefixes theirs (loader_: the model loaders), but
for `client` and `http`: the official openai client and an httpx client of a module's `base`
fixture (a server started with tests.serving's API_KEY), which a module may define for itself; and
`int4_activations`, the CPU int4 kernel's activations (int16, int8) for a test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Without a GPU, Triton kernels run in Triton's interpreter. The switch must be set before any
# test module (or torch) imports Triton, so it lives here rather than in the kernel tests.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.serving import http_client, openai_client


@pytest.fixture(scope="session")
def loader_default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, converted once per test session into a private PAGODA_CACHE_DIR
    (its grandparent)."""
    from pagoda.loader.default_model import default_model_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGODA_CACHE_DIR", str(tmp_path_factory.mktemp("loader-cache")))
        return default_model_dir()


@pytest.fixture(params=["int16", "int8"])
def int4_activations(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The CPU int4 kernel's activations for one test, in this process and in the engine processes it
    starts; "int8" is skipped where the CPU has none (AVX512-VNNI: int16 only; no C kernel)."""
    from pagoda.kernels import cpu_native
    from tests.test_int4pack import int8_activations

    before = "int8" if int8_activations() else "int16"
    monkeypatch.setenv("PAGODA_CPU_INT4_ACTIVATIONS", request.param)
    if cpu_native.int_matmuls_available():
        cpu_native.set_int4_activations(request.param)
    if request.param == "int8" and not int8_activations():
        pytest.skip("no int8 activations on this CPU")
    yield request.param
    if cpu_native.int_matmuls_available():
        cpu_native.set_int4_activations(before)


@pytest.fixture(scope="module")
def client(base: str):
    return openai_client(base)


@pytest.fixture(scope="module")
def http(base: str):
    with http_client(base) as c:
        yield c
