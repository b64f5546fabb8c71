"""The engine end to end on tiny random models: request validation (each error leaves the engine
serving), n > 1, seeds, stop strings and token ids, abort, and the timings of RequestOutput."""

from __future__ import annotations

import json

import pytest

from pagoda import LLM, SamplingParams
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = save_tiny_model("llama3", tmp_path_factory.mktemp("engine"))
    return LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=64,
               num_gpu_blocks_override=32, block_size=4, enable_chunked_prefill=True)


def _run(llm: LLM, prompt: list[int], **params) -> list[int]:
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(**params), use_tqdm=False)[0]
    return out.outputs[0].token_ids


def _still_serves(llm: LLM) -> None:
    assert len(_run(llm, [5, 6, 7], temperature=0.0, max_tokens=4, ignore_eos=True)) == 4
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([3] * 64, "max_model_len"),  # as long as the model's limit: nothing left to generate
        ([3] * 200, "max_model_len"),
        ([], "empty"),
        ([3, 999999], "vocabulary"),
        ([3, -1], "vocabulary"),
    ],
)
def test_bad_prompt_is_refused_and_engine_goes_on(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        _run(llm, prompt, max_tokens=4)
    _still_serves(llm)


def test_prompt_that_can_never_fit_the_pool_is_refused(tmp_path):
    path = save_tiny_model("qwen3", tmp_path)
    small = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=64,
                num_gpu_blocks_override=8, block_size=4)  # room for 32 tokens in all
    with pytest.raises(ValueError, match="num_gpu_blocks_override"):
        _run(small, [3] * 40, max_tokens=1)  # within max_model_len, but larger than the pool
    _still_serves(small)


def test_a_prompts_cache_salt_keeps_its_blocks_to_the_same_salt(llm):
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]  # two full blocks of 4

    def cached(salt: str | None) -> int:
        request = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        return llm.generate(request, SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens

    assert (cached("a"), cached("a"), cached("b"), cached(None), cached(None)) == (0, 8, 0, 0, 8)
    with pytest.raises(ValueError, match="^cache_salt="):
        cached("")
    _still_serves(llm)


def test_priority_scheduling_runs_the_lowest_priority_value_first(tmp_path):
    path = save_tiny_model("llama3", tmp_path)
    one_at_a_time = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=64,
                        max_num_seqs=1, scheduling_policy="priority")
    prompts = [{"prompt_token_ids": [5, 6, i]} for i in range(4)]
    outputs = one_at_a_time.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False, priority=[2, 0, 1, -1])
    started = [out.metrics.first_scheduled_time for out in outputs]
    assert sorted(range(4), key=started.__getitem__) == [3, 1, 2, 0]
    with pytest.raises(ValueError, match="entries for 4 prompts"):
        one_at_a_time.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False, priority=[1])


def test_a_priority_needs_priority_scheduling(llm):
    with pytest.raises(ValueError, match="^priority=3 .*scheduling_policy='priority'"):
        llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2), use_tqdm=False, priority=[3])
    _still_serves(llm)


def test_bad_prompt_in_a_batch_adds_nothing(llm):
    prompts = [{"prompt_token_ids": [4, 5]}, {"prompt_token_ids": []}]
    with pytest.raises(ValueError):
        llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    _still_serves(llm)


def test_mismatched_sampling_params_list(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([{"prompt_token_ids": [4]}] * 2, [SamplingParams()] * 3, use_tqdm=False)
    _still_serves(llm)


def test_n_samples_and_seeds(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": [9, 8, 7]}, params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in first.outputs)
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # the children draw differently
    # The same seeded request alongside other traffic gives the same tokens.
    others = [{"prompt_token_ids": [i, i + 1]} for i in range(10, 14)]
    mixed = llm.generate(
        others + [{"prompt_token_ids": [9, 8, 7]}],
        [SamplingParams(temperature=1.0, max_tokens=5)] * 4 + [params],
        use_tqdm=False,
    )[-1]
    assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in first.outputs]


def test_stop_token_ids_and_max_tokens(llm):
    greedy = _run(llm, [11, 12, 13], temperature=0.0, max_tokens=10, ignore_eos=True)
    stop_at = greedy[3]
    out = llm.generate({"prompt_token_ids": [11, 12, 13]},
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    length = llm.generate({"prompt_token_ids": [11, 12, 13]},
                          SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert length[0].outputs[0].finish_reason == "length"


def test_abort_frees_everything(llm):
    engine = llm.llm_engine
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("b", [6, 7], SamplingParams(n=2, max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.engine_core.engine_core.scheduler.kv_cache_manager.usage > 0
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    assert engine.engine_core.engine_core.scheduler.kv_cache_manager.usage == 0.0
    _still_serves(llm)


def test_request_output_timings(llm):
    out = llm.generate({"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=3), use_tqdm=False)[0]
    m = out.metrics
    assert out.finished
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_eos_ids_come_from_generation_config_and_stop_generation(tmp_path):
    path = save_tiny_model("qwen2-mqa", tmp_path)
    probe = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    greedy = _run(probe, [7, 8, 9], temperature=0.0, max_tokens=8, ignore_eos=True)
    # Llama 3 style: generation_config.json lists several EOS ids; the 3rd greedy token is one.
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [greedy[2], 250]}))
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    assert {greedy[2], 250} <= llm.llm_engine.processor.config.model.eos_token_ids
    out = llm.generate({"prompt_token_ids": [7, 8, 9]}, SamplingParams(temperature=0.0, max_tokens=8),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(greedy[2]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None


def test_offline_llm_refuses_data_parallelism_and_unknown_arguments():
    with pytest.raises(ValueError, match="pagoda serve --data-parallel-size"):
        LLM(data_parallel_size=2)
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(max_num_sequences=4)


def test_final_only_requests_output_once_and_the_same(llm):
    """Offline generate asks for final outputs only: no per-step RequestOutput (each would copy
    every token so far); what finally comes equals a step-by-step request's last output."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    engine.add_request("steps", [4, 5, 6], params)
    engine.add_request("final", [4, 5, 6], params, final_only=True)
    seen: dict[str, list] = {"steps": [], "final": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    assert len(seen["steps"]) == 6 and len(seen["final"]) == 1 and seen["final"][0].finished
    last, final = seen["steps"][-1].outputs[0], seen["final"][0].outputs[0]
    assert (final.token_ids, final.finish_reason) == (last.token_ids, last.finish_reason)
    # Two rows of one batch: the same logprobs up to BLAS rounding.
    assert [lp[t].logprob for lp, t in zip(final.logprobs, final.token_ids)] == pytest.approx(
        [lp[t].logprob for lp, t in zip(last.logprobs, last.token_ids)], abs=1e-5)


def test_a_16_bit_models_logprobs_are_computed_in_float32(tmp_path):
    """The LM head hands over logits in the model's dtype; prompt and sample logprobs are still
    computed in float32 (a bf16 log-softmax would round every value to bf16's 8 bits)."""
    import torch

    path = save_tiny_model("llama3", tmp_path)
    llm = LLM(model=str(path), device="cpu", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=64)
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2, logprobs=2)
    out = llm.generate({"prompt_token_ids": [3, 4, 5, 6, 7, 8]}, params, use_tqdm=False)[0]
    values = [x.logprob for lp in out.prompt_logprobs[1:] + out.outputs[0].logprobs for x in lp.values()]
    rounded = [v for v in values if torch.tensor(v).bfloat16().item() == v]
    assert len(values) == 23 and rounded == [], rounded


def test_a_cpu_pool_reuses_freed_blocks_past_one_request_of_max_model_len(tmp_path):
    # The CPU pool's pages are resident once written: past max_model_len's blocks (8 here) freed
    # blocks are reused before never-used ones, so one request after another stays in those 8
    # (it was 5 more each, toward all 64); blocks held at once still grow past them.
    path = save_tiny_model("llama3", tmp_path)
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=32,
              num_gpu_blocks_override=64, block_size=4)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    first = [_run(llm, [10 + r] * 10, temperature=0.0, max_tokens=10, ignore_eos=True) for r in range(10)]
    assert pool.num_used == 8
    again = [_run(llm, [10 + r] * 10, temperature=0.0, max_tokens=10, ignore_eos=True) for r in range(10)]
    assert again == first  # reused blocks hand no request another's K/V
    prompts = [{"prompt_token_ids": [40 + r] * 10} for r in range(4)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert pool.num_used > 8  # four requests at once hold 20 blocks


def test_reset_prefix_cache_makes_the_next_prompt_compute_whole(llm):
    prompt = {"prompt_token_ids": [21, 22, 23, 24, 25, 26, 27, 28, 29]}
    params = SamplingParams(max_tokens=1)
    llm.generate(prompt, params, use_tqdm=False)
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 8
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 0
    _still_serves(llm)
