"""The Triton sampling kernels, natively on a GPU or on the CPU under TRITON_INTERPRET=1: greedy
sampling against torch's argmax; per-row seeded exponential noise."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernel_device import DEVICE, require_kernels

require_kernels()

from pagoda.kernels.sampling import exponential_noise, greedy_sample  # noqa: E402



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [5, 2048, 5000])  # under, at and over one block of columns
def test_greedy_sample_matches_torch(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * 4).to(dtype)
    logits[1, : vocab // 2] = float("-inf")  # masked columns, as a logit processor leaves them
    logits[2, vocab // 3] = logits[2, vocab - 1] = logits[2].max() + 1  # a tie: the first column wins
    tokens = greedy_sample(logits.to(DEVICE))
    assert tokens.cpu().tolist() == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("rows", [1, 3, 40, 600])  # many splits of a row down to one split each
def test_greedy_sample_splits_rows(rows):
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 9000, generator=g) * 3
    logits[0, 8999] = logits[0].max() + 1  # in the last split
    logits[-1, 4097] = logits[-1, 8000] = logits[-1].max() + 1  # a tie across splits
    tokens = greedy_sample(logits.to(DEVICE))
    assert tokens.cpu().tolist() == logits.argmax(dim=-1).tolist()


def test_greedy_sample_reads_strided_rows():
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1))
    view = logits.to(DEVICE)[:, :2500]  # rows of a wider tensor
    tokens = greedy_sample(view)
    assert tokens.cpu().tolist() == logits[:, :2500].argmax(dim=-1).tolist()


def test_exponential_noise_is_a_function_of_each_rows_seed():
    seeds = torch.tensor([7, 123456789012345, 7, 2**62], device=DEVICE)
    noise = exponential_noise(seeds, 5000).cpu()
    assert torch.equal(noise[0], noise[2])  # same seed, same row, wherever it sits in the batch
    assert not torch.equal(noise[0], noise[1])
    alone = exponential_noise(seeds[1:2], 5000).cpu()
    assert torch.equal(alone[0], noise[1])
    assert (noise > 0).all()


def test_exponential_noise_is_exp_1():
    noise = exponential_noise(torch.arange(8, device=DEVICE) * 1_000_003, 5000).cpu().flatten()
    # Exp(1): mean 1, P(X > 1) = e^-1, P(X > 3) = e^-3; 40,000 draws put these well inside 4 sigma.
    assert abs(noise.mean().item() - 1.0) < 0.02
    assert abs((noise > 1).float().mean().item() - math.exp(-1)) < 0.01
    assert abs((noise > 3).float().mean().item() - math.exp(-3)) < 0.005
