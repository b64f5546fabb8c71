"""Directories written whole or not at all, and a check that one still is.

The files go into a temporary sibling directory; when they are all written they are synced to
disk, listed with their sizes in a manifest, and the directory is renamed into place. An
interrupted write (an exception, Ctrl-C, a full disk) leaves at most the temporary sibling, and a
crash cannot leave the final name pointing at files whose data never reached the disk. What later
cuts a file short (a person, another program) is what `directory_problem` finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# In the name of the temporary directory written before it is renamed into place.
PARTIAL_DIR_MARK = ".partial-"
# Every other file of the directory, with its size; written last.
MANIFEST = "pagoda-files.json"


@contextlib.contextmanager
def write_directory_atomically(out_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; when the block ends without an exception it
    becomes `out_dir`, synced to disk; when it raises (KeyboardInterrupt included) it is removed."""
    if out_dir.exists():
        raise FileExistsError(f"cannot write {out_dir}: it already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL_DIR_MARK}", dir=out_dir.parent))
    try:
        yield partial
        _seal(partial)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _fsync(out_dir.parent)  # the rename itself


def directory_problem(directory: Path) -> str | None:
    """What is wrong with a directory written by write_directory_atomically (missing, no manifest,
    a file missing or of another size than written); None when nothing is."""
    if not directory.is_dir():
        return "it does not exist"
    try:
        sizes = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST}, so it was not written whole"
    except (OSError, ValueError) as error:
        return f"its {MANIFEST} does not read: {error}"
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, not the {size:,} written (cut short or damaged)"
    return None


def _seal(directory: Path) -> None:
    """Sync every file to disk and list it in the manifest, itself synced: the rename that follows
    must not reach the disk before the data does."""
    files = sorted(directory.iterdir())  # flat: the conversion writes no subdirectories
    for path in files:
        _fsync(path)
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({p.name: p.stat().st_size for p in files}))
    _fsync(manifest)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
