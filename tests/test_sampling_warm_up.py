"""Start-up's sampling warm-up (ModelRunner.warm_up_sampler, called on a GPU once the KV pool is
allocated; tests/test_gpu.py checks that no sampler kernel compiles after it): one row of logits as
each architecture's head computes them from a zero hidden state, sampled greedily and at random.
Apart from the kernels it compiles, the path is the same on the CPU, where CI runs it here."""

from __future__ import annotations

import pytest

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
