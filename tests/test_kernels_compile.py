"""Every Triton kernel compiles for Hopper (sm_90) on this machine, GPU or not
(scripts/compile_kernels.py, in a process of its own: this one may run Triton's interpreter,
which accepts code that the compiler refuses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).parent.parent / "scripts" / "compile_kernels.py"


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines and all(line.endswith("bytes of sm_90 code") for line in lines), done.stdout
    assert any(line.startswith("paged attention, split decode:") for line in lines)
