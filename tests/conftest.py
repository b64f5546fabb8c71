"""Fixtures shared across test files; each owner prefixes theirs (loader_: the model loaders)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def loader_default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, converted once per test session into a private PAGODA_CACHE_DIR
    (its grandparent)."""
    from pagoda.loader.default_model import default_model_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGODA_CACHE_DIR", str(tmp_path_factory.mktemp("loader-cache")))
        return default_model_dir()
