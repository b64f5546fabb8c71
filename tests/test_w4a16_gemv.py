"""The W4A16 GEMV (pagoda/kernels/w4a16_gemv.py) against the torch reference: under TRITON_INTERPRET=1
on small shapes (its PTX emulated; scripts/compile_kernels.py compiles the PTX for sm_90), natively
on a GPU at the 8B model's shapes, also replayed in a CUDA graph; and which matmuls w4a16_linear gives it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagoda.kernels import device_info
from pagoda.kernels import w4a16_gemv as w4a16_gemv_module
from pagoda.kernels.w4a16_gemv import (
    MIN_WAVES, MIN_WEIGHTS, NARROW, NARROW_MAX_WORDS, NARROW_MIN_WAVES, WIDE, launch, pays, w4a16_gemv,
)
from pagoda.kernels.w4a16_layout import w4a16_gemm_reference
from pagoda.quantization.w4a16 import PackedW4, _gemv_runs, w4a16_linear
from tests.kernel_device import DEVICE, KERNELS_RUN, NO_KERNELS, ON_GPU
from tests.test_w4a16_kernel import SHAPES_8B, random_weights

needs_kernel = pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)


def gemv_error(k: int, n: int, group_size: int, zeros: bool, seed: int, device: str) -> tuple[float, float]:
    """(max, RMS) of the GEMV's error relative to the float32 reference's largest and RMS output; the
    second of two calls, which must agree (a split launch's counts are left zeroed for the next)."""
    qweight, scales, zero, _, group, _ = random_weights(k, n, group_size, zeros, False, seed, dtype=torch.bfloat16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    ref = w4a16_gemm_reference(x.float(), qweight, scales.float(), None if zero is None else zero.float(), None, group)
    on = [None if t is None else t.to(device) for t in (x, qweight, scales, zero)]
    first, second = w4a16_gemv(*on, group), w4a16_gemv(*on, group)
    assert torch.equal(first, second)
    error = second.float().cpu() - ref
    return (error.abs().max() / ref.abs().max()).item(), (error.pow(2).mean() / ref.pow(2).mean()).sqrt().item()


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128, "channel"])
@pytest.mark.parametrize("zeros", [True, False])
# The interpreter's one SM (MIN_WAVES wide column blocks fill it): wide tiles over all of K; narrow
# tiles over a short K, ragged along K and N; a longer K in 4 slices of wide tiles, the last ragged;
# narrow tiles over a longer K where NARROW_MIN_WAVES of them fill the SM, ragged along K and N.
@pytest.mark.parametrize("k,n", [
    (256, MIN_WAVES * WIDE.columns), (8 * (NARROW.words + 8), NARROW.columns + 8),
    (8 * (NARROW_MAX_WORDS + WIDE.words + 8), WIDE.columns),
    (8 * (NARROW_MAX_WORDS + NARROW.words + 16), NARROW_MIN_WAVES * NARROW.columns + 8),
])
def test_gemv_equals_reference(group_size, zeros, k, n):
    group = k if group_size == "channel" else group_size
    if k % group:
        pytest.skip(f"groups of {group} do not divide {k} inputs")
    worst, rms = gemv_error(k, n, group, zeros, seed=k + n + group, device=DEVICE)
    # A bfloat16 output (and on a GPU, products summed 4 at a time in bfloat16): ~3e-3 RMS.
    assert worst < 2e-2 and rms < 6e-3


def test_narrow_layers_take_narrow_tiles_or_split_a_long_k_into_whole_tiles():
    cpu = torch.device("cpu")  # the interpreter's one SM: MIN_WAVES wide column blocks fill it
    assert launch(MIN_WAVES * WIDE.columns, 32 * WIDE.words, cpu) == (WIDE, 32 * WIDE.words, 1)  # all of K
    assert launch(2 * WIDE.columns, NARROW_MAX_WORDS, cpu) == (NARROW, NARROW_MAX_WORDS, 1)
    narrow_fill = NARROW_MIN_WAVES * NARROW.columns  # columns whose narrow tiles fill the one SM
    assert launch(narrow_fill, 32 * WIDE.words, cpu) == (NARROW, 32 * WIDE.words, 1)
    assert launch(narrow_fill - NARROW.columns, NARROW_MAX_WORDS + 8, cpu) == (WIDE, 3 * WIDE.words, 3)  # ragged
    assert launch(WIDE.columns, 32 * WIDE.words, cpu) == (WIDE, 8 * WIDE.words, 4)


def test_gemv_refuses_what_it_cannot_run():
    qweight, scales, zero, _, group, _ = random_weights(64, 16, 32, True, False, seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one bfloat16 row of 64 inputs"):
        w4a16_gemv(torch.zeros(2, 64, dtype=torch.bfloat16), qweight, scales, zero, group)
    with pytest.raises(ValueError, match="float16"):
        w4a16_gemv(torch.zeros(1, 64, dtype=torch.float16), qweight, scales, zero, group)


def test_linear_gives_the_gemv_one_bfloat16_row_of_a_large_layer_without_act_order():
    k = 64
    n = MIN_WEIGHTS // k
    assert pays(n, k) and not pays(n - 1, k)
    qweight, scales, zero, g_idx, group, _ = random_weights(k, n, 32, True, True, seed=1, dtype=torch.bfloat16)
    w = PackedW4(qweight, scales, zero, None, group)
    row = torch.zeros(1, k, dtype=torch.bfloat16)
    assert _gemv_runs(row, w)
    assert not _gemv_runs(torch.zeros(2, k, dtype=torch.bfloat16), w)
    assert not _gemv_runs(row.half(), w)
    assert not _gemv_runs(row, PackedW4(qweight, scales, zero, g_idx, group))
    scales4, zero4 = (t.repeat_interleave(8, dim=0) for t in (scales, zero))  # groups of 4: the kernel refuses them
    assert not _gemv_runs(row, PackedW4(qweight, scales4, zero4, None, 4))
    assert not _gemv_runs(row, PackedW4(qweight[:, :-1], scales[:, :-1], zero[:, :-1], None, group))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", SHAPES_8B)
@pytest.mark.parametrize("zeros", [True, False])
def test_gemv_at_8b_shapes_on_gpu(n, k, zeros):
    worst, rms = gemv_error(k, n, 128, zeros, seed=n + k, device="cuda")
    assert worst < 2e-2 and rms < 6e-3


def test_the_8b_shapes_go_where_they_were_measured_fastest():
    assert [pays(n, k) for n, k in SHAPES_8B] == [True, False, True, True]  # qkv, o, gate_up, down


def test_the_8b_and_70b_shapes_launch_as_measured_fastest_on_132_sms(monkeypatch):
    """The launches scripts/sweep_w4a16_gemv.py found fastest on an H100 (132 SMs, as an H200's)."""
    sms = lambda device, on_cpu: 132  # noqa: E731
    monkeypatch.setattr(device_info, "num_sms", sms)
    monkeypatch.setattr(w4a16_gemv_module, "num_sms", sms)
    cpu = torch.device("cpu")
    launches = [launch(n, k // 8, cpu) for n, k in SHAPES_8B]  # qkv, o, gate_up, down
    assert launches == [(NARROW, 512, 1), (NARROW, 512, 1), (WIDE, 512, 1), (WIDE, 4 * WIDE.words, 7)]
    shapes_70b = [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
    launches = [launch(n, k // 8, cpu) for n, k in shapes_70b]
    assert launches == [(NARROW, 1024, 1), (NARROW, 1024, 1), (WIDE, 1024, 1), (NARROW, 3584, 1)]
    assert launch(3584, 18944 // 8, cpu) == (WIDE, 5 * WIDE.words, 8)  # Qwen2.5-7B's down: 224 narrow tiles


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", SHAPES_8B)
def test_linear_on_gpu_replays_the_gemv_in_a_cuda_graph(n, k):
    """w4a16_linear's one-row path equals its eager self when replayed (a split launch's counts reset)."""
    qweight, scales, zero, _, group, _ = random_weights(k, n, 128, True, False, seed=5, dtype=torch.bfloat16)
    w = PackedW4(qweight.cuda(), scales.cuda(), zero.cuda(), None, group)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    eager = w4a16_linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = w4a16_linear(x, w)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, eager)
    if pays(n, k):
        assert torch.equal(eager, w4a16_gemv(x, w.qweight, w.scales, w.zeros, group))
