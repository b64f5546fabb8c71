"""Where Pagoda keeps what it derives from model files once (the default model's conversion,
GGUF files' quantized weights): $PAGODA_CACHE_DIR, default ~/.cache/pagoda."""

from __future__ import annotations

import os
from pathlib import Path


def pagoda_cache_dir() -> Path:
    return Path(os.environ.get("PAGODA_CACHE_DIR") or Path.home() / ".cache" / "pagoda").expanduser()
