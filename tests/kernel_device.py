"""Where a test module's Triton kernels run: natively on a GPU, else under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton)."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS_RUN = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
NO_KERNELS = "no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it)"


def require_kernels() -> None:
    """Skip the calling module where its kernels cannot run; call it before importing them."""
    if not KERNELS_RUN:
        pytest.skip(NO_KERNELS, allow_module_level=True)
    pytest.importorskip("triton")
