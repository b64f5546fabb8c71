"""Start-up's sampling warm-up (ModelRunner.warm_up_sampler, called on a GPU once the KV pool is
allocated; tests/test_gpu.py checks that no sampler kernel compiles after it): one row of logits as
each architecture's head computes them from a zero hidden state, sampled greedily and at random.
Apart from the kernels it compiles, the path is the same on the CPU, where CI runs it here."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.worker import model_runner
from tests.tiny_models import ARCHITECTURES, save_tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_warm_up_samples_from_each_architectures_head(arch, tmp_path, monkeypatch):
    llm = LLM(model=str(save_tiny_model(arch, tmp_path)), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    sample = model_runner.warm_up_sampling
    logits_seen = []
    monkeypatch.setattr(model_runner, "warm_up_sampling", lambda logits: sample(logits_seen.append(logits) or logits))
    llm.llm_engine.engine_core.engine_core.executor.worker.runner.warm_up_sampler()
    assert [tuple(logits.shape) for logits in logits_seen] == [(1, llm.llm_engine.processor.vocab_size)]


def test_the_warm_up_computes_the_logits_of_every_row_count_a_step_samples(tmp_path, monkeypatch):
    """cuBLAS's first GEMM of a kernel it has not run held the host until the GPU drained: start-up
    runs the head once over each row count up to max_num_seqs."""
    llm = LLM(model=str(save_tiny_model("llama3", tmp_path)), device="cpu", skip_tokenizer_init=True,
              max_model_len=64, max_num_seqs=6)
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.runner
    compute_logits = runner.model.compute_logits
    rows_seen = []
    monkeypatch.setattr(runner.model, "compute_logits", lambda h, *a: compute_logits(rows_seen.append(len(h)) or h, *a))
    runner.warm_up_sampler()
    assert rows_seen == [1, 2, 3, 4, 5, 6]


def test_a_gpu_head_pads_sampled_rows_past_8_to_a_multiple_of_8():
    """So that the warm-up's 39 shapes (1-8, then 16, 24, ..., 256) are every shape the head's GEMM
    meets in steps of up to 256 sampled rows; the CPU computes the rows it is given."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [model_runner.head_rows(n, cuda) for n in (1, 7, 8, 9, 16, 17, 255, 256)] == [1, 7, 8, 16, 16, 24, 256, 256]
    assert {model_runner.head_rows(n, cuda) for n in range(1, 257)} == {*range(1, 9), *range(16, 257, 8)}
    assert all(model_runner.head_rows(n, cpu) == n for n in range(1, 257))


def test_padded_rows_leave_each_rows_logits_as_they_were(tmp_path, monkeypatch):
    """The head computes padded rows where head_rows says so; the step reads its own rows' logits."""
    llm = LLM(model=str(save_tiny_model("llama3", tmp_path)), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.runner
    monkeypatch.setattr(model_runner, "head_rows", lambda rows, device: -(-rows // 8) * 8)
    hidden = torch.randn(11, runner.hidden_size, dtype=runner.dtype)
    logits = runner._compute_logits(hidden, argmax_only=False)
    assert logits.shape[0] == 11
    torch.testing.assert_close(logits, runner.model.compute_logits(hidden), rtol=1e-5, atol=1e-5)
