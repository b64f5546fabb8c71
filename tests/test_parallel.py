"""Tensor and pipeline parallelism on the CPU (gloo, one worker process per rank): the same greedy
tokens and logprobs as one process on every architecture; worker processes end with the engine;
and the configuration rules raise or warn as documented."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import random
import signal

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.config.groups import ParallelConfig
from pagoda.config.model_spec import ModelSpec
from pagoda.config.resolve import model_spec
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import ScheduledChunk, SchedulerOutput
from pagoda.distributed.partition import kv_head_shard, stage_layers
from pagoda.parallel_config import GpuInventory, check_parallel_layout, detect_gpus, estimate_weight_bytes
from pagoda.worker.step_codec import StepDecoder, StepEncoder
from tests.tiny_models import ARCHITECTURES, save_tiny_model

# An odd vocabulary: the vocabulary-parallel embedding and LM head pad the last rank's shard.
VOCAB = 251
MAX_NEW = 8
GIB = 1 << 30


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(2)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (3, 21, 40, 9)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)


def _generate(path, prompts, params: SamplingParams = GREEDY, **parallel) -> list[tuple[list[int], list[float]]]:
    # A budget of 16 tokens a step: chunked prefills mixed with decodes, over many steps.
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, block_size=4,
              **parallel)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outputs]


def _assert_same(got: list[tuple[list[int], list[float]]], expected: list[tuple[list[int], list[float]]]) -> None:
    """The same tokens, with logprobs equal up to the order of float sums across ranks."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, ours), (_, reference) in zip(got, expected):
        assert ours == pytest.approx(reference, abs=1e-4)


def _workers() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("pagoda-worker-")]


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parallel_generation_equals_one_process(arch, layout, prompts, tmp_path):
    path = save_tiny_model(arch, tmp_path, vocab_size=VOCAB)
    expected = _generate(path, prompts)
    _assert_same(_generate(path, prompts, **layout), expected)
    assert not _workers()  # shutdown joined every rank


def test_tp2_x_pp2_equals_one_process(prompts, tmp_path):
    path = save_tiny_model("llama3", tmp_path, vocab_size=VOCAB, num_hidden_layers=3)  # stages of 1 and 2 layers
    _assert_same(_generate(path, prompts[:2], tensor_parallel_size=2, pipeline_parallel_size=2),
                 _generate(path, prompts[:2]))


def test_seeded_sampling_at_tp2_equals_one_process(prompts, tmp_path):
    """Seeds and min_tokens count the tokens generated so far; the workers' request mirrors must
    count them as the engine does, also for prompts whose prefill took several chunks."""
    path = save_tiny_model("llama3", tmp_path, vocab_size=VOCAB)
    params = SamplingParams(temperature=1.0, seed=5, min_tokens=3, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    _assert_same(_generate(path, prompts, params, tensor_parallel_size=2), _generate(path, prompts, params))


def test_dummy_weights_are_the_same_at_any_tp(tmp_path):
    path = save_tiny_model("qwen2-mqa", tmp_path, vocab_size=VOCAB)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)

    def run(**parallel):
        llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, load_format="dummy", **parallel)
        out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, params, use_tqdm=False)[0].outputs[0]
        llm.shutdown()
        return [(out.token_ids, [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)])]

    _assert_same(run(tensor_parallel_size=2), run())


def test_a_dead_worker_fails_the_step_and_no_worker_is_left(prompts, tmp_path):
    path = save_tiny_model("qwen3", tmp_path, vocab_size=VOCAB)
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2)
    os.kill(next(p.pid for p in _workers() if p.name == "pagoda-worker-1"), signal.SIGKILL)
    # Whichever the engine notices first: rank 1's death, or rank 0's collective failing without it.
    with pytest.raises(RuntimeError, match="worker rank (1 died|0 failed)"):
        llm.generate({"prompt_token_ids": prompts[0]}, use_tqdm=False)
    assert not _workers()
    with pytest.raises(RuntimeError, match="stopped"):
        llm.generate({"prompt_token_ids": prompts[0]}, use_tqdm=False)
    llm.shutdown()  # a second stop is harmless


# Step messages -------------------------------------------------------------------------------------


def test_step_messages_keep_worker_mirrors_equal_to_the_engine_requests():
    encoder, decoder = StepEncoder(), StepDecoder()
    params = SamplingParams(max_tokens=10)
    a, b = (Request(rid, [3, 4, 5], params, frozenset({1}), 64) for rid in "ab")

    def step(*reqs: Request):
        chunks = [ScheduledChunk(r, r.num_tokens - 1, 1, [0, 1], True) for r in reqs]
        message = encoder.encode(SchedulerOutput(chunks, len(chunks)))
        out = decoder.decode(pickle.loads(pickle.dumps(message)))
        assert [(c.request.token_ids, c.request.output_token_ids) for c in out.chunks] == [
            (r.token_ids, r.output_token_ids) for r in reqs
        ]
        return message

    assert len(step(a).new_requests) == 1
    a.append_output_token(9)
    a.append_output_token(8)  # a was not scheduled in between: both tokens travel at once
    message = step(a, b)
    assert message.appended == [("a", [9, 8])] and [r.request_id for r in message.new_requests] == ["b"]
    a.status = RequestStatus.FINISHED_STOPPED
    reused = Request("a", [6], params, frozenset({1}), 64)  # the id of a finished request, used again
    message = step(reused)
    assert message.finished == ["a"] and message.new_requests == [reused]


# Partition -----------------------------------------------------------------------------------------


def test_kv_heads_are_split_or_replicated():
    assert [kv_head_shard(8, r, 4) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # One KV head per pair of ranks: each rank holds the head its query heads read.
    assert [kv_head_shard(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_head_shard(1, r, 2) for r in range(2)] == [(0, 1), (0, 1)]
    with pytest.raises(ValueError, match="tensor_parallel_size=4 .* 6 KV heads"):
        kv_head_shard(6, 0, 4)


def test_stages_cover_every_layer_once():
    stages = [stage_layers(7, r, 3) for r in range(3)]
    assert [list(s) for s in stages] == [[0, 1], [2, 3], [4, 5, 6]]


# Configuration rules -------------------------------------------------------------------------------


def _shape(**fields) -> ModelSpec:
    return model_spec(transformers.LlamaConfig(**{**LLAMA_8B, **fields}))


LLAMA_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, num_attention_heads=64, intermediate_size=28672, num_hidden_layers=80)
H100 = 80 * GIB


def _check(shape, gpus: GpuInventory | None = None, **parallel) -> None:
    layout = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1, **parallel}
    check_parallel_layout(ParallelConfig(**layout), shape, torch.bfloat16, 0.9, gpus)


def test_weight_estimates_match_the_known_models():
    assert estimate_weight_bytes(_shape(), torch.bfloat16) / 1e9 == pytest.approx(16.06, abs=0.05)
    assert estimate_weight_bytes(_shape(**LLAMA_70B), torch.bfloat16) / 1e9 == pytest.approx(141.1, abs=0.2)


def test_tp_must_divide_the_attention_heads():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the model's 32 attention heads"):
        _check(_shape(), tensor_parallel_size=3)


def test_tp_must_fit_the_kv_heads():
    with pytest.raises(ValueError, match="tensor_parallel_size=4 must divide the model's 6 KV heads"):
        _check(_shape(hidden_size=6144, num_attention_heads=48, num_key_value_heads=6), tensor_parallel_size=4)


def test_pp_must_not_exceed_the_layers():
    with pytest.raises(ValueError, match="pipeline_parallel_size=33 is more than the model's 32 layers"):
        _check(_shape(), pipeline_parallel_size=33)


def test_more_gpus_than_visible_are_refused():
    with pytest.raises(ValueError, match="data_parallel_size=4 needs 8 GPUs, but 4 are visible"):
        _check(_shape(), GpuInventory(4, H100), tensor_parallel_size=2, data_parallel_size=4)


def test_no_visible_gpu_is_named_as_such():
    """Not as weights that fit no GPU of 0 GiB (what a --device cuda run without a GPU was told)."""
    with pytest.raises(ValueError, match=r"^device='cuda', but no CUDA GPU is visible"):
        _check(_shape(), GpuInventory(0, 0))


def test_weights_that_do_not_fit_name_the_smallest_tp_that_does():
    with pytest.raises(ValueError, match=r"131\.\d GiB .* use tensor_parallel_size=2, the smallest that fits"):
        _check(_shape(**LLAMA_70B), GpuInventory(2, H100))
    _check(_shape(**LLAMA_70B), GpuInventory(2, H100), tensor_parallel_size=2)


def test_idle_gpus_get_a_better_split(caplog):
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        _check(_shape(), GpuInventory(4, H100))
    assert "4 GPUs are visible and TP=1 x PP=1 x DP=1 uses 1: 3 left idle; use --data-parallel-size 4" in caplog.text
    caplog.clear()
    # 48 heads split 3 ways; but 2 ranks hold these 83 GiB of weights, and TP=2 x DP=2 uses all 4 GPUs.
    shape = _shape(**{**LLAMA_70B, "hidden_size": 6144, "num_attention_heads": 48, "num_key_value_heads": 12,
                       "intermediate_size": 24576})
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        _check(shape, GpuInventory(4, H100), tensor_parallel_size=3)
    assert "use --tensor-parallel-size 2 --data-parallel-size 2 (TP=2 x PP=1 x DP=2)" in caplog.text


def test_a_layout_that_uses_every_gpu_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        _check(_shape(**LLAMA_70B), GpuInventory(8, H100), tensor_parallel_size=2, data_parallel_size=4)
    assert caplog.text == ""


def test_the_gpu_inventory_can_be_stated(monkeypatch):
    monkeypatch.setenv("PAGODA_NUM_GPUS", "8")
    monkeypatch.setenv("PAGODA_GPU_MEMORY_GIB", "80")
    assert detect_gpus() == GpuInventory(8, H100)


def test_the_engine_checks_the_layout_before_starting_workers(tmp_path):
    path = save_tiny_model("llama3", tmp_path)  # 4 attention heads
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's 4 attention heads"):
        LLM(model=str(path), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=3)
    assert not _workers()


@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"])
def test_sizes_must_be_positive(field):
    with pytest.raises(ValueError, match=f"{field}=0 is invalid: must be >= 1"):
        EngineConfig(**{field: 0})


def test_one_named_gpu_cannot_hold_several_ranks():
    with pytest.raises(ValueError, match="device='cuda:1' names one GPU"):
        EngineConfig(device="cuda:1", tensor_parallel_size=2)
