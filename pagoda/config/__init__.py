"""The engine's configuration: EngineConfig is what a user sets; ResolvedConfig (config/groups.py)
what the engine is built from, made once by config/resolve.py."""

from pagoda.config.engine_config import (
    DEFAULT_CPU_KV_CACHE_GIB,
    DTYPES,
    LOAD_FORMATS,
    EngineConfig,
)

__all__ = ["DEFAULT_CPU_KV_CACHE_GIB", "DTYPES", "LOAD_FORMATS", "EngineConfig"]
