"""The shared int4 pack (pagoda/quantization/int4pack.py) on the CPU against the reference
(dequantize, then matmul): W = (q - 8) * scale + zero with GGUF's float zeros and with the W4A16
formats' integer zero points (zero = (8 - z) * scale), at every group size it serves (larger
groups and per-channel scales through repeated scales), in bfloat16's tolerance; which layers it
refuses; and that it returns the activations' dtype. Its tolerances serve every test of a layer
or model the int4 kernels run (GGUF's, the W4A16 formats')."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import cpu_native
from pagoda.kernels.w4a16_layout import dequantize, pack_int4
from pagoda.quantization.int4pack import Int4Pack, kernel_group_size
from pagoda.quantization.w4a16 import PackedW4, to_int4pack

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def int8_activations() -> bool:
    """Whether the CPU's int4 kernel now takes its activations in int8 steps (the C matmul on AVX2,
    as llama.cpp's: cpu_native.c says why) rather than in int16, or bfloat16 (torch's kernel)."""
    return cpu_native.int_matmuls_available() and cpu_native.int4_activation_levels() == 127


def assert_bf16_close(got: torch.Tensor, exact: torch.Tensor) -> None:
    """The kernel runs in bfloat16 (8 significant bits; float32 sums): within a few of its
    rounding steps (2**-8 relative) of the exact product, where a wrong scale or zero is far off.
    Activations in int8 steps of each 32 inputs' largest (2**-7) land within ~1-3 % (3.1 % seen: a
    row-parallel shard of per-channel AWQ weights with zero points); a wrong scale or zero is far off."""
    tolerance = 6e-2 if got.device.type == "cpu" and int8_activations() else 5e-3
    assert ((got - exact).norm() / exact.norm()).item() < tolerance


# Nats between the reference's two best tokens where the bfloat16 kernel (8 significant bits: logits
# of 10-20 move by a few hundredths) may swap them. The default model's haiku parts at 0.068.
NEAR_TIE = 0.1
# With int8 activations: they move the default model's logprobs of a text's tokens by 0.07 nats at
# the median, 0.27 at the 90th percentile (0.67 at most, 333 tokens); its greedy answers part at gaps
# of 0.13-0.17.
INT8_NEAR_TIE = 0.5


def assert_same_greedy(ours, reference) -> None:
    """Our greedy tokens (run on the CPU) equal the reference's, or part from them only where the
    reference's two best tokens were within the CPU kernel's near-tie (each CompletionOutput with
    logprobs=2)."""
    same = [a == b for a, b in zip(ours.token_ids, reference.token_ids)]
    if all(same) and len(ours.token_ids) == len(reference.token_ids):
        return
    first = same.index(False) if not all(same) else min(len(ours.token_ids), len(reference.token_ids))
    top2 = sorted((lp.logprob for lp in reference.logprobs[first].values()), reverse=True)[:2]
    near_tie = INT8_NEAR_TIE if int8_activations() else NEAR_TIE
    assert top2[0] - top2[1] < near_tie, (first, top2[0] - top2[1], ours.token_ids, reference.token_ids)


def rows_of(k: int, rows: int) -> torch.Tensor:
    """Fixed activations [rows, k]."""
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))


# (N, K, group size): SmolLM2-135M's gate/up and down projections and a Llama-8B-like width; the
# kernels' own group sizes, and larger groups and per-channel scales (group = K) they serve in
# their largest dividing size.
SHAPES = [
    (1536, 576, 32), (1536, 576, 64), (1536, 576, 576),
    (576, 1536, 128), (576, 1536, 256), (576, 1536, 512), (576, 1536, 1536),
    (256, 4096, 128), (256, 4096, 4096),
]


@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_gguf_mapping_equals_the_reference(n, k, group_size):
    """Float scales and zeros per group, as GGUF's Q4_0/Q4_1/Q4_K map onto them."""
    g = torch.Generator().manual_seed(n + group_size)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group_size, generator=g) * 0.02 + 1e-3
    zeros = (torch.rand(n, k // group_size, generator=g) - 0.5) * 0.1
    pack = Int4Pack.from_values(q, scales, zeros, group_size)
    groups = torch.arange(k) // group_size
    w = (q.float() - 8) * scales[:, groups] + zeros[:, groups]
    for rows in (1, 7, 65):
        x = rows_of(k, rows)
        assert_bf16_close(pack.matmul(x), x @ w.t())


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("zero_points", [True, False])
def test_w4a16_mapping_equals_the_reference(group_size, zero_points):
    """Integer zero points (AWQ, asymmetric GPTQ and compressed-tensors) or none (symmetric: 8)."""
    k, n = 512, 96
    g = torch.Generator().manual_seed(group_size)
    scales = torch.rand(k // group_size, n, generator=g) * 0.02 + 5e-3
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g).float() if zero_points else None
    w = PackedW4(pack_int4(torch.randint(0, 16, (k, n), generator=g)), scales, zeros, None, group_size)
    pack = to_int4pack(w)
    for rows in (1, 16):
        x = rows_of(k, rows)
        assert_bf16_close(pack.matmul(x), x @ dequantize(w.qweight, w.scales, w.zeros, None, group_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_in_the_activations_dtype_with_bias_over_leading_dims(dtype):
    n, k = 32, 64
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    scales, zeros = torch.full((n, 2), 0.01), torch.zeros(n, 2)
    pack = Int4Pack.from_values(q, scales, zeros, 32)
    x, bias = torch.randn(2, 3, k).to(dtype), torch.randn(n).to(dtype)
    out = pack.linear(x, bias)
    assert out.dtype == dtype and out.shape == (2, 3, n)
    exact = x.float() @ ((q.float() - 8) * 0.01).t() + bias.float()
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)


def test_group_sizes_served():
    assert [kernel_group_size(size) for size in (16, 32, 96, 128, 384, 576, 4096, 40)] == [
        None, 32, 32, 128, 128, 64, 256, None,
    ]


@pytest.mark.parametrize("n,k,group_size,device,dtype,fits", [
    (1536, 576, 64, CPU, torch.float32, True),  # the CPU: any activation dtype (cast to bfloat16)
    (1536, 576, 576, CPU, torch.float16, True),  # per-channel
    (1536, 576, 16, CPU, torch.float32, False),  # groups below the kernels' smallest
    (1536, 200, 200, CPU, torch.float32, False),  # per-channel, K not a multiple of 32
    (1528, 576, 64, CPU, torch.float32, False),  # the CPU's packing: N a multiple of 16
    (1536, 576, 128, CPU, torch.float32, False),  # groups that do not divide K
    (1528, 4096, 128, CUDA, torch.bfloat16, True),  # tinygemm: N a multiple of 8,
    (1536, 576, 64, CUDA, torch.bfloat16, False),  # K of 128,
    (1536, 4096, 128, CUDA, torch.float16, False),  # bfloat16 models only
])
def test_which_layers_fit(n, k, group_size, device, dtype, fits):
    assert Int4Pack.fits(n, k, group_size, device, dtype) is fits
