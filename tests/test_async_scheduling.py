"""Asynchronous scheduling (step N+1 planned and launched before step N's tokens are read) gives
what one step at a time gives: the same tokens, logprobs, finish reasons and prefix-cache hits,
through preemption, stops, aborts, seeds and penalties. On the CPU nothing overlaps, but the
placeholders, the device-side input tokens and the late reads are the same code as on a GPU."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("async")))


def _llm(model_dir: str, async_scheduling: bool, num_blocks: int = 64) -> LLM:
    # 4-token blocks and a small pool: prefix-cache blocks fill often and requests get preempted.
    return LLM(model=model_dir, device="cpu", skip_tokenizer_init=True, max_model_len=64, block_size=4,
               num_gpu_blocks_override=num_blocks, max_num_batched_tokens=32, async_scheduling=async_scheduling)


def _workload(stop_at: int) -> tuple[list[dict], list[SamplingParams]]:
    shared = [5, 9, 13, 17, 21, 25, 29, 33, 37]  # 9 tokens: two full blocks shared by prompts
    prompts = [{"prompt_token_ids": shared + [i, i + 1]} for i in range(6)]
    prompts += [{"prompt_token_ids": [40 + i] * (3 + 5 * i)} for i in range(4)]
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = [
        SamplingParams(max_tokens=20, **greedy),
        SamplingParams(max_tokens=1, **greedy),
        SamplingParams(max_tokens=12, stop_token_ids=[stop_at], **greedy),
        SamplingParams(max_tokens=15, temperature=0.9, seed=3, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=10, n=2, temperature=1.0, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=9, min_tokens=6, stop_token_ids=[stop_at], **greedy),
        SamplingParams(max_tokens=14, prompt_logprobs=1, **greedy),
        SamplingParams(max_tokens=18, **greedy),
        SamplingParams(max_tokens=7, temperature=0.8, top_k=5, top_p=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=16, **greedy),
    ]
    return prompts, params


def _summary(outputs) -> list:
    rows = []
    for out in outputs:
        for c in out.outputs:
            logprobs = None if c.logprobs is None else [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
            rows.append((c.index, c.token_ids, c.finish_reason, c.stop_reason, logprobs))
        prompt = None if out.prompt_logprobs is None else [
            None if lp is None else max(x.logprob for x in lp.values()) for lp in out.prompt_logprobs]
        rows.append((out.num_cached_tokens, prompt))
    return rows


def assert_same_outputs(got: list, expected: list) -> None:
    """Two `_summary`s: the same tokens, finish reasons and cached counts, and logprobs equal
    within 1e-3 (batches of other shapes sum in another order: the last digits may differ)."""
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        assert len(row) == len(want)
        for value, wanted in zip(row, want):
            if isinstance(wanted, list) and any(isinstance(x, float) for x in wanted):
                assert [x is None for x in value] == [x is None for x in wanted]
                assert [x for x in value if x is not None] == pytest.approx([x for x in wanted if x is not None], abs=1e-3)
            else:
                assert value == wanted


@pytest.mark.parametrize("num_blocks", [64, 14], ids=["roomy", "preempting"])
def test_async_scheduling_matches_one_step_at_a_time(model_dir, num_blocks):
    sync, overlapped = _llm(model_dir, False, num_blocks), _llm(model_dir, True, num_blocks)
    probe = ({"prompt_token_ids": [5, 9, 13, 17, 21, 25, 29, 33, 37, 2, 3]},
             SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))
    overlapped.generate(*probe, use_tqdm=False)  # the same prefix-cache contents in both
    stop_at = sync.generate(*probe, use_tqdm=False)[0].outputs[0].token_ids[3]
    prompts, params = _workload(stop_at)
    expected = _summary(sync.generate(prompts, params, use_tqdm=False))
    got = _summary(overlapped.generate(prompts, params, use_tqdm=False))
    assert_same_outputs(got, expected)
    assert any(row[2] == "stop" for row in expected if len(row) == 5)  # the stop id was hit
    if num_blocks == 14:
        assert overlapped.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0
    engine = overlapped.llm_engine
    assert not engine.has_unfinished_requests() and engine.engine_core.engine_core.scheduler.kv_cache_manager.usage == 0.0


def test_penalised_requests_step_one_at_a_time_and_match(model_dir):
    """Penalties read every generated token on the host: while such a request runs, the engine
    reads each step before planning the next, then overlaps again."""
    sync, overlapped = _llm(model_dir, False), _llm(model_dir, True)
    prompts = [{"prompt_token_ids": [7, 8, 9, i]} for i in range(3)]
    params = [
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12),
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6, repetition_penalty=1.5,
                       frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12),
    ]
    assert_same_outputs(_summary(overlapped.generate(prompts, params, use_tqdm=False)),
                        _summary(sync.generate(prompts, params, use_tqdm=False)))


def test_outputs_of_a_step_arrive_one_call_later(model_dir):
    overlapped = _llm(model_dir, True).llm_engine
    sync = _llm(model_dir, False).llm_engine
    for engine in (overlapped, sync):
        engine.add_request("r", [3, 4, 5], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert overlapped.step() == []  # launched, not read
    steps = [sync.step() for _ in range(3)]
    assert [overlapped.step() for _ in range(3)][0][0].outputs[0].token_ids == steps[0][0].outputs[0].token_ids
    assert not overlapped.has_unfinished_requests() and not sync.has_unfinished_requests()


def test_abort_with_a_step_in_flight(model_dir):
    sync, overlapped = _llm(model_dir, False), _llm(model_dir, True)
    engine = overlapped.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request("gone", [1, 2, 3, 4, 5], params)
    engine.add_request("kept", [6, 7, 8], params)
    seen = []
    for _ in range(3):
        seen += engine.step()
    engine.abort_request("gone")
    assert engine.engine_core.engine_core.scheduler.kv_cache_manager.usage > 0  # "kept" still holds its blocks
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert engine.engine_core.engine_core.scheduler.kv_cache_manager.usage == 0.0
    assert {o.request_id for o in seen if o.finished} == {"kept"}
    kept = [o for o in seen if o.request_id == "kept"][-1].outputs[0].token_ids
    assert kept == sync.generate({"prompt_token_ids": [6, 7, 8]}, params, use_tqdm=False)[0].outputs[0].token_ids
    # The engine goes on: a later request is served, after the leftover step in flight is read.
    again = overlapped.generate({"prompt_token_ids": [6, 7, 8]}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == kept
