"""Every script under scripts/ imports Pagoda names that exist. Most of them run on the GPU only,
so a renamed function would otherwise break a benchmark unnoticed until a device call (as
`_num_sms` -> `device_info.num_sms` broke scripts/bench_attention.py)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import python_path

ROOT = Path(__file__).parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("**/*.py"))


def _pagoda_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for each `from pagoda... import name`, (module, None) for `import pagoda...`."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pagoda":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "pagoda"]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT / "scripts")) for s in SCRIPTS])
def test_script_imports_resolve(script):
    for module_name, name in _pagoda_imports(script):
        module = importlib.import_module(module_name)
        if name is not None and not hasattr(module, name):
            importlib.import_module(f"{module_name}.{name}")  # a submodule, or ImportError names it


def test_the_serve_tracer_wraps_what_it_names(tmp_path):
    # scripts/serve_trace patches the engine core's step, the front end's handling of steps and
    # the benchmark client's run by name at start-up, where a failure is only a warning on stderr.
    env = {**os.environ, "PAGODA_STEP_TRACE": str(tmp_path), **python_path(ROOT / "scripts" / "serve_trace", ROOT)}
    check = (
        "from pagoda.engine import core, async_llm; from pagoda.benchmarks import serve; "
        "print(core.EngineCore.step.__name__, async_llm.AsyncLLM._process.__name__, serve._run.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["traced_step", "traced_process", "traced_run"], done.stderr
