"""Every script under scripts/ imports Pagoda names that exist. Most of them run on the GPU only,
so a renamed function would otherwise break a benchmark unnoticed until a device call (as
`_num_sms` -> `device_info.num_sms` broke scripts/bench_attention.py)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("*.py"))


def _pagoda_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for each `from pagoda... import name`, (module, None) for `import pagoda...`."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pagoda":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "pagoda"]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_imports_resolve(script):
    for module_name, name in _pagoda_imports(script):
        module = importlib.import_module(module_name)
        if name is not None and not hasattr(module, name):
            importlib.import_module(f"{module_name}.{name}")  # a submodule, or ImportError names it
