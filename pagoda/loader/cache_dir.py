"""Where Pagoda keeps what it derives from model files once (the default model's conversion,
GGUF files' quantized weights): $PAGODA_CACHE_DIR, default ~/.cache/pagoda."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def pagoda_cache_dir() -> Path:
    return Path(os.environ.get("PAGODA_CACHE_DIR") or Path.home() / ".cache" / "pagoda").expanduser()


def write_text_atomically(path: Path, text: str) -> None:
    """text into path (its directory existing), whole or not at all: written beside it, then renamed
    over it, so a process reading it sees the old file or the new one. OSError as writing raises it,
    leaving no partial file."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
