"""Multi-token steps on a CUDA GPU: decode CUDA graphs captured for 1 + K query tokens per request
give the eager path's tokens, replay for such steps, and launch without waiting for the GPU.
Skipped without a GPU (run by scripts/gpu_check.sh)."""

from __future__ import annotations

import gc
import random

import pytest
import torch

from pagoda import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from tests.test_multi_token_steps import (
    FutureProposer,
    K,
    _generate,
    _tokens,
    first_right_then_wrong,
)
from tests.tiny_models import save_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _engine(path, proposer, eager: bool, dtype: str) -> LLMEngine:
    config = EngineConfig(model=str(path), device="cuda", dtype=dtype, skip_tokenizer_init=True,
                          gpu_memory_utilization=0.2, max_model_len=256, max_num_seqs=32, enforce_eager=eager)
    return LLMEngine(config, proposer)


def _executor(engine: LLMEngine):
    return engine.engine_core.engine_core.executor  # the in-process core's


def _release() -> None:
    """Give an engine's GPU memory back before the next one sizes its KV pool from what is free."""
    gc.collect()
    torch.cuda.empty_cache()


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 256) for _ in range(rng.randrange(3, 40))] for _ in range(21)]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=8 + i, ignore_eos=True) for i in range(21)]


def _count_equal(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """Tokens equal up to each sequence's first difference (a near-tie may flip under another
    matmul shape; what follows it differs legitimately), and the tokens in all."""
    same = 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same, sum(map(len, a))


def _run(path, proposer, eager: bool, dtype: str, prompts, params) -> tuple[list[list[int]], int, list[int]]:
    """Tokens, engine steps, and the query tokens per request of each graph replay."""
    engine = _engine(path, proposer, eager=eager, dtype=dtype)
    graphs = _executor(engine).worker.runner.decode_graphs
    assert (graphs is None) == eager
    replayed: list[int] = []
    if graphs is not None:
        assert graphs.query_lens == [1, 1 + K]
        run = graphs.run

        def counting_run(input_ids, positions, slot_mapping, seq_lens, block_tables):
            replayed.append(input_ids.shape[0] // seq_lens.shape[0])
            return run(input_ids, positions, slot_mapping, seq_lens, block_tables)

        graphs.run = counting_run
    outputs, steps = _generate(engine, prompts, params)
    if graphs is not None:
        del graphs.run  # the wrapper holds the graphs: no cycle may outlive the engine
    return _tokens(outputs), steps, replayed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_with_draft_tokens_give_the_eager_tokens(tmp_path, dtype):
    path = save_tiny_model("qwen3", tmp_path)
    prompts, params = _workload()
    plain, plain_steps, _ = _run(path, None, True, dtype, prompts, params)
    _release()
    futures = {str(i): tokens for i, tokens in enumerate(plain)}
    for corrupt in (lambda i, t: t, first_right_then_wrong):
        eager, eager_steps, _ = _run(path, FutureProposer(futures, corrupt), True, dtype, prompts, params)
        _release()
        graphed, graphed_steps, replayed = _run(path, FutureProposer(futures, corrupt), False, dtype, prompts, params)
        _release()
        assert eager_steps < plain_steps and graphed_steps < plain_steps
        assert 1 + K in replayed  # multi-token steps replayed graphs
        same, total = _count_equal(eager, graphed)
        assert same >= 0.95 * total, f"{same}/{total} tokens equal"
        same, total = _count_equal(plain, graphed)
        assert same >= 0.9 * total, f"{same}/{total} tokens equal to the plain run"


def test_launching_a_multi_token_step_never_waits_for_the_gpu(tmp_path):
    path = save_tiny_model("llama3", tmp_path)
    prompts, params = _workload()
    plain, _, _ = _run(path, None, True, "bfloat16", prompts, params)
    _release()
    futures = {str(i): tokens for i, tokens in enumerate(plain)}
    engine = _engine(path, FutureProposer(futures, first_right_then_wrong), eager=False, dtype="bfloat16")
    executor = _executor(engine)
    launch, drafted = executor.launch, []

    def strict_launch(scheduler_output):
        torch.cuda.set_sync_debug_mode("error")
        try:
            drafted.extend(len(c.draft_token_ids) for c in scheduler_output.chunks)
            return launch(scheduler_output)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    executor.launch = strict_launch
    outputs, _ = _generate(engine, prompts, params)
    del executor.launch  # the wrapper holds the executor: no cycle may outlive the engine
    assert [len(t) for t in _tokens(outputs)] == [p.max_tokens for p in params]
    assert K in drafted
