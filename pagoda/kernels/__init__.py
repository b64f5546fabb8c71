"""Pagoda's Triton kernels (and the CPU's C kernels, pagoda/kernels/cpu_native.py)."""

import os

# Triton 3.10 stops contracting multiply-adds into FMAs by default (3.9 warns at each first compile);
# the kernels' speed and their tests' tolerances assume contraction, as every Triton before it did.
# A user's own setting (or TRITON_FORCE_DISABLE_FP_FUSION) still wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
