"""The batched LoRA kernels (shrink + expand, per token and segmented, pagoda/kernels/lora.py)
against the torch path (pagoda/lora/layers.py) on mixed batches: tokens of several adapter slots
and of none, ranks and widths that are not powers of two, runs longer than a tile. The kernels run natively on a GPU, or on the CPU under
TRITON_INTERPRET=1; the reference always runs on CPU copies."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

pytest.importorskip("triton")

from pagoda.kernels.lora import add_lora_segments_triton, add_lora_triton
from pagoda.lora.layers import LoRAContext, add_lora_torch

DEVICE = "cuda" if ON_GPU else "cpu"


def _case(num_tokens: int, k: int, n: int, rank: int, slots: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g).to(dtype)
    out = torch.randn(num_tokens, n, generator=g).to(dtype)
    lora_a = (torch.randn(slots, rank, k, generator=g) * 0.1).to(dtype)
    lora_b = (torch.randn(slots, n, rank, generator=g) * 0.1).to(dtype)
    # Every slot and -1 (no adapter), in runs as a batch's requests give them, and interleaved.
    indices = torch.randint(-1, slots, (num_tokens,), generator=g, dtype=torch.int32)
    indices[: num_tokens // 2] = torch.arange(num_tokens // 2, dtype=torch.int32) % (slots + 1) - 1
    indices[-1] = slots - 1
    return out, x, lora_a, lora_b, indices


def _check(case, dtype: torch.dtype, atol: float) -> None:
    out, x, lora_a, lora_b, indices = case
    want = out.clone()
    add_lora_torch(want, x, lora_a, lora_b, indices)
    got = out.to(DEVICE)
    add_lora_triton(got, x.to(DEVICE), lora_a.to(DEVICE), lora_b.to(DEVICE), indices.to(DEVICE))
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=atol, atol=atol)
    untouched = indices == -1
    assert torch.equal(got.cpu()[untouched], out[untouched])  # tokens without an adapter keep the base output
    assert not torch.equal(want, out)


@pytest.mark.parametrize(("num_tokens", "k", "n", "rank", "slots"), [
    (1, 64, 64, 8, 1),  # one decode token
    (9, 200, 130, 24, 3),  # a fused layer's three rank-8 parts; widths off the block sizes
    (33, 96, 48, 16, 4),
])
def test_kernels_match_torch(num_tokens, k, n, rank, slots):
    _check(_case(num_tokens, k, n, rank, slots, seed=num_tokens, dtype=torch.float32), torch.float32, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []))
def test_segmented_kernels_match_torch_on_prompt_chunks(dtype):
    """Chunks as a step gives them: prompt chunks and decodes, with and without adapters, two
    neighbours with one adapter merged into one run; the runs come from LoRAContext."""
    chunk_slots, query_lens = [0, 0, -1, 2, 1, -1, 1, 2], [40, 3, 17, 70, 1, 5, 1, 9]
    context = LoRAContext(sum(query_lens) + 8, torch.device(DEVICE))
    context.set_batch(chunk_slots, query_lens)
    assert context.segments is not None and context.segments.shape[1] == 5  # the two slot-0 chunks are one run
    indices = context.indices[: sum(query_lens)].cpu()
    out, x, lora_a, lora_b, _ = _case(len(indices), 136, 100, 24, 3, seed=7, dtype=dtype)
    want = out.clone()
    add_lora_torch(want, x, lora_a, lora_b, indices)
    got = out.to(DEVICE)
    add_lora_segments_triton(got, x.to(DEVICE), lora_a.to(DEVICE), lora_b.to(DEVICE), context.segments,
                             context.max_segment_len)
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=atol, atol=atol)
    untouched = indices == -1
    assert torch.equal(got.cpu()[untouched], out[untouched])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_torch_natively_in_half_precision(dtype):
    _check(_case(300, 4096, 6144, 48, 8, seed=3, dtype=dtype), dtype, 3e-2)
