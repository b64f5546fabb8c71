"""The W4A16 Triton GEMM and one-pass dequantization against their torch reference (dequantize,
then matmul): on the CPU under TRITON_INTERPRET=1 on small shapes, through both configurations
(split-K decode tiles and large-M tiles); natively on a GPU at the 8B model's shapes, with every
CUDA path of w4a16_linear (tinygemm, dequantize + cuBLAS, the Triton GEMM)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagoda.kernels.w4a16_gemm import GemmConfig, choose_config, w4_dequantize, w4a16_gemm
from pagoda.kernels.w4a16_layout import dequantize, pack_int4, unpack_int4, w4a16_gemm_reference
from pagoda.quantization.w4a16 import (
    DEQUANTIZE_MIN_ROWS,
    TINYGEMM_MAX_ROWS,
    PackedW4,
    to_int4pack,
    w4a16_linear,
)
from tests.kernel_device import DEVICE, KERNELS_RUN, NO_KERNELS, ON_GPU

needs_kernel = pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)


def random_weights(k: int, n: int, group_size: int, zeros: bool, act_order: bool, seed: int, dtype=torch.float32):
    """(qweight, scales, zeros, g_idx, group_size, q) in the kernel's layout, q the 4-bit values [K, N]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)
    groups = k // group_size
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).to(dtype)
    zero = torch.randint(0, 16, (groups, n), generator=g).to(dtype) if zeros else None
    g_idx = (torch.randperm(k, generator=g) // group_size).to(torch.int32) if act_order else None
    return pack_int4(q), scales, zero, g_idx, group_size, q


def test_pack_layout_is_eight_input_rows_per_word_low_nibble_first():
    q = torch.randint(0, 16, (16, 3))
    packed = pack_int4(q)
    assert packed.shape == (2, 3) and packed.dtype == torch.int32
    for i in range(2):
        for j in range(8):
            assert torch.equal((packed[i] >> (4 * j)) & 0xF, q[8 * i + j].int())
    assert torch.equal(unpack_int4(packed, dim=0), q.int())
    assert torch.equal(unpack_int4(packed.t().contiguous(), dim=1), q.t().int())


def test_reference_dequantizes_each_row_with_its_group():
    qweight, scales, zeros, g_idx, group_size, q = random_weights(64, 8, 32, zeros=True, act_order=True, seed=1)
    w = dequantize(qweight, scales, zeros, g_idx, group_size)
    for k in (0, 17, 63):
        grp = int(g_idx[k])
        torch.testing.assert_close(w[k], (q[k].float() - zeros[grp]) * scales[grp])
    sym = dequantize(qweight, scales, None, None, group_size)
    torch.testing.assert_close(sym[40], (q[40].float() - 8) * scales[1])


CONFIGS = {
    "decode-split-k": GemmConfig(16, 32, 128, split_k=3, num_warps=4, num_stages=2),
    "decode-wide-k": GemmConfig(16, 64, 256, split_k=1, num_warps=4, num_stages=2),
    "large-m": GemmConfig(64, 64, 128, split_k=1, num_warps=4, num_stages=2),
    "chosen": None,
}


@needs_kernel
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("group_size", [32, 64, 128, "channel"])
@pytest.mark.parametrize("zeros,act_order", [(True, False), (False, False), (True, True)])
def test_kernel_equals_reference(config, group_size, zeros, act_order):
    m = 70 if config == "large-m" else 3
    k, n = 256, 96
    group = k if group_size == "channel" else group_size
    qweight, scales, zero, g_idx, group, _ = random_weights(k, n, group, zeros, act_order, seed=group + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = w4a16_gemm_reference(x, qweight, scales, zero, g_idx, group)
    on = [None if t is None else t.to(DEVICE) for t in (x, qweight, scales, zero, g_idx)]
    out = w4a16_gemm(*on, group, config=CONFIGS[config])
    # ON_GPU the inputs stay fp32 (tf32 dot): loose; in the interpreter fp32 exactly as the reference.
    tol = 2e-2 if ON_GPU else 1e-4
    torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)


@needs_kernel
def test_k_not_a_multiple_of_the_tile():
    qweight, scales, zero, g_idx, group, _ = random_weights(96, 40, 32, True, False, seed=3)
    x = torch.randn(5, 96)
    ref = w4a16_gemm_reference(x, qweight, scales, zero, g_idx, group)
    on = [t.to(DEVICE) for t in (x, qweight, scales, zero)]
    torch.testing.assert_close(w4a16_gemm(*on, None, group).cpu(), ref, rtol=1e-2 if ON_GPU else 1e-4, atol=1e-2)


def test_small_m_splits_k_and_large_m_does_not():
    device = torch.device("cpu")
    assert choose_config(1, 4096, 4096, device).block_m == 16
    assert choose_config(512, 4096, 4096, device).split_k == 1
    assert choose_config(512, 4096, 4096, device).block_m == 128


# The 8B model's linear shapes (N, K): qkv, o, gate|up fused, down.
SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64, 512])
@pytest.mark.parametrize("n,k", SHAPES_8B)
def test_kernel_at_8b_shapes_on_gpu(m, n, k):
    assert choose_config(m, n, k, torch.device("cuda")).split_k >= (2 if m == 1 else 1)
    qweight, scales, zero, _, group, _ = random_weights(k, n, 128, True, False, seed=m, dtype=torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    on = [t.cuda() for t in (x, qweight, scales, zero)]
    out = w4a16_gemm(*on, None, group).float()
    ref = x.cuda().float() @ dequantize(*on[1:], None, group).float()
    # bf16 output and bf16 dequantized weights: relative to the output's scale.
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("zeros", [True, False])
def test_one_pass_dequantize_equals_reference(group_size, zeros):
    qweight, scales, zero, _, group, _ = random_weights(256, 200, group_size, zeros, False, seed=group_size)
    on = [None if t is None else t.to(DEVICE) for t in (qweight, scales, zero)]
    assert torch.equal(w4_dequantize(*on, group).cpu(), dequantize(qweight, scales, zero, None, group))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, TINYGEMM_MAX_ROWS, 64, DEQUANTIZE_MIN_ROWS])
@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("n,k", SHAPES_8B[:2])
@pytest.mark.parametrize("per_channel", [False, True])  # per-channel: tinygemm's groups of 256, scales repeated
def test_every_cuda_path_equals_reference(m, zeros, n, k, per_channel):
    group_size = k if per_channel else 128
    qweight, scales, zero, _, group, _ = random_weights(k, n, group_size, zeros, False, seed=m, dtype=torch.bfloat16)
    w = PackedW4(qweight.cuda(), scales.cuda(), None if zero is None else zero.cuda(), None, group)
    int4 = to_int4pack(w)
    assert int4 is not None
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = w4a16_linear(x, w, None, int4).float()
    ref = x.float() @ dequantize(w.qweight, w.scales, w.zeros, None, group).float()
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
