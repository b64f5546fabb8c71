"""The W4A16 GEMV (pagoda/kernels/w4a16_gemv.py) against the torch reference: under TRITON_INTERPRET=1
on small shapes (its PTX emulated; scripts/compile_kernels.py compiles the PTX for sm_90), natively
on a GPU at the 8B model's shapes; and which matmuls w4a16_linear gives it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagoda.kernels.w4a16_gemv import BLOCK_N, BLOCK_WORDS, fills_gpu, w4a16_gemv
from pagoda.kernels.w4a16_layout import w4a16_gemm_reference
from pagoda.quantization.w4a16 import PackedW4, _gemv_runs, w4a16_linear
from tests.kernel_device import DEVICE, KERNELS_RUN, NO_KERNELS, ON_GPU
from tests.test_w4a16_kernel import SHAPES_8B, random_weights

needs_kernel = pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)


def gemv_error(k: int, n: int, group_size: int, zeros: bool, seed: int, device: str) -> tuple[float, float]:
    """(max, RMS) of the GEMV's error relative to the float32 reference's largest and RMS output."""
    qweight, scales, zero, _, group, _ = random_weights(k, n, group_size, zeros, False, seed, dtype=torch.bfloat16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    ref = w4a16_gemm_reference(x.float(), qweight, scales.float(), None if zero is None else zero.float(), None, group)
    on = [None if t is None else t.to(device) for t in (x, qweight, scales, zero)]
    error = w4a16_gemv(*on, group).float().cpu() - ref
    return (error.abs().max() / ref.abs().max()).item(), (error.pow(2).mean() / ref.pow(2).mean()).sqrt().item()


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128, "channel"])
@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("k,n", [(256, 2 * BLOCK_N), (8 * (BLOCK_WORDS + 8), BLOCK_N + 8)])  # ragged tiles
def test_gemv_equals_reference(group_size, zeros, k, n):
    group = k if group_size == "channel" else group_size
    if k % group:
        pytest.skip(f"groups of {group} do not divide {k} inputs")
    worst, rms = gemv_error(k, n, group, zeros, seed=k + n + group, device=DEVICE)
    # A bfloat16 output (and on a GPU, products summed 4 at a time in bfloat16): ~3e-3 RMS.
    assert worst < 2e-2 and rms < 6e-3


def test_gemv_refuses_what_it_cannot_run():
    qweight, scales, zero, _, group, _ = random_weights(64, 16, 32, True, False, seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one bfloat16 row of 64 inputs"):
        w4a16_gemv(torch.zeros(2, 64, dtype=torch.bfloat16), qweight, scales, zero, group)
    with pytest.raises(ValueError, match="float16"):
        w4a16_gemv(torch.zeros(1, 64, dtype=torch.float16), qweight, scales, zero, group)


def test_linear_gives_the_gemv_one_bfloat16_row_of_a_wide_layer_without_act_order():
    device = torch.device("cpu")  # the interpreter's launch shapes: one SM
    wide = 4 * BLOCK_N
    assert fills_gpu(wide, device) and not fills_gpu(wide - BLOCK_N, device)
    qweight, scales, zero, g_idx, group, _ = random_weights(64, wide, 32, True, True, seed=1, dtype=torch.bfloat16)
    w = PackedW4(qweight, scales, zero, None, group)
    row = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert _gemv_runs(row, w)
    assert not _gemv_runs(torch.zeros(2, 64, dtype=torch.bfloat16), w)
    assert not _gemv_runs(row.half(), w)
    assert not _gemv_runs(row, PackedW4(qweight, scales, zero, g_idx, group))
    scales4, zero4 = (t.repeat_interleave(8, dim=0) for t in (scales, zero))  # groups of 4: the kernel refuses them
    assert not _gemv_runs(row, PackedW4(qweight, scales4, zero4, None, 4))
    assert not _gemv_runs(row, PackedW4(qweight[:, :-BLOCK_N], scales[:, :-BLOCK_N], zero[:, :-BLOCK_N], None, group))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", SHAPES_8B)
@pytest.mark.parametrize("zeros", [True, False])
def test_gemv_at_8b_shapes_on_gpu(n, k, zeros):
    worst, rms = gemv_error(k, n, 128, zeros, seed=n + k, device="cuda")
    assert worst < 2e-2 and rms < 6e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_one_row_of_gate_up_goes_through_the_gemv_on_gpu():
    n, k = SHAPES_8B[2]
    qweight, scales, zero, _, group, _ = random_weights(k, n, 128, True, False, seed=5, dtype=torch.bfloat16)
    w = PackedW4(qweight.cuda(), scales.cuda(), zero.cuda(), None, group)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    assert fills_gpu(n, x.device) and not fills_gpu(SHAPES_8B[1][0], x.device)
    assert torch.equal(w4a16_linear(x, w), w4a16_gemv(x, w.qweight, w.scales, w.zeros, group))
