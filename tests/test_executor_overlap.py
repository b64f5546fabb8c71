"""Overlapped steps (asynchronous scheduling) through the executors of worker ranks, on the CPU
(gloo): the multiprocess executor at TP=2, PP=2 and both (one rank runs in the engine's own process,
not in a worker) and the Ray executor at TP=1 and TP=2 on a local cluster of two simulated nodes.
Outputs with async scheduling on equal those with it off (greedy, seeded, logprobs, stops,
preemption, grammars whose masks follow the step in flight); the next step is posted to the ranks
before the step before it is collected; a rank killed while steps are in flight ends the run with
the error naming the rank. The Ray tests are skipped without Ray. On CUDA (marked gpu): the Ray
executor at TP=1 on one GPU, and the multiprocess one at TP=2 and PP=2 over NCCL on two."""

from __future__ import annotations

import gc
import os
import re
import signal

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.killed_run import executor_of, run_until_killed
from tests.serving import save_tokenizer
from tests.test_async_scheduling import _summary, _workload, assert_same_outputs
from tests.test_gpu import _mixed_requests
from tests.test_structured_outputs import SCHEMAS, _json, _texts
from tests.tiny_models import save_tiny_model

LAYOUTS = {
    "tp2": {"tensor_parallel_size": 2},
    "pp2": {"pipeline_parallel_size": 2},
    "tp2-pp2": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
}
PROBE = ({"prompt_token_ids": [5, 9, 13, 17, 21, 25, 29, 33, 37, 2, 3]},
         SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("overlap")))


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="pip install 'pagoda[ray]'")
    from tests.ray_cluster import two_node_cluster

    with two_node_cluster() as cluster:
        yield cluster


def _llm(model_dir: str, async_scheduling: bool, **parallel) -> LLM:
    # 4-token blocks and a small pool: requests get preempted.
    return LLM(model=model_dir, device="cpu", skip_tokenizer_init=True, max_model_len=64, block_size=4,
               num_gpu_blocks_override=14, max_num_batched_tokens=32, async_scheduling=async_scheduling, **parallel)


def _steps_in_flight(llm: LLM) -> dict[str, list[int]]:
    """Fills, as the LLM runs, with the number of steps posted to the ranks and not yet collected
    after each launch, and with each deferred sampling posted."""
    executor = executor_of(llm)
    post, seen = executor._post, {"in_flight": [], "sampled_later": []}

    def count(method: str, args: tuple) -> None:
        if method == "launch":
            seen["in_flight"].append((seen["in_flight"] or [0])[-1] + 1)
        elif method == "collect":
            seen["in_flight"].append(seen["in_flight"][-1] - 1)
        elif method == "sample":
            seen["sampled_later"].append(1)
        elif method == "run_calls":  # several calls in one message
            for call in args[0]:
                count(*call)

    def counted(method: str, *args) -> None:
        count(method, args)
        post(method, *args)

    executor._post = counted
    return seen


def _workload_outputs(llm: LLM, stop_at: int | None = None) -> tuple[list, int]:
    """The summary of async scheduling's test workload, and the stop id it used (picked from the
    probe's tokens on the first run; the probe also fills the prefix cache alike)."""
    probe = llm.generate(*PROBE, use_tqdm=False)[0].outputs[0].token_ids[3]
    stop_at = probe if stop_at is None else stop_at
    prompts, params = _workload(stop_at)
    return _summary(llm.generate(prompts, params, use_tqdm=False)), stop_at


def _run_both_ways(model_dir: str, **parallel) -> None:
    """One step at a time, then overlapped, one LLM at a time (a Ray cluster of two CPUs holds one
    TP=2 run): the same outputs; overlapped, a step is posted while the one before is in flight."""
    outputs, in_flight = [], []
    stop_at = None
    for async_scheduling in (False, True):
        llm = _llm(model_dir, async_scheduling, **parallel)
        try:
            seen = _steps_in_flight(llm)
            summary, stop_at = _workload_outputs(llm, stop_at)
            outputs.append(summary)
            in_flight.append(max(seen["in_flight"], default=0))
            assert llm.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0
        finally:
            llm.shutdown()
    assert_same_outputs(outputs[1], outputs[0])
    assert any(row[2] == "stop" for row in outputs[0] if len(row) == 5)  # the stop id was hit
    assert in_flight == [0, 2]  # one call a step when read at once


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_overlapped_steps_on_worker_processes_match_one_step_at_a_time(model_dir, layout):
    _run_both_ways(model_dir, **layout)


def test_grammar_masks_of_overlapped_steps_reach_the_sampling_worker(tmp_path):
    """A constrained step's sampling waits for the masks that follow the step in flight: they go
    to the ranks in a call of their own, after the step was posted."""
    vocab_size = save_tokenizer(tmp_path / "llama3")
    model = str(save_tiny_model("llama3", tmp_path, vocab_size=vocab_size))
    prompts = [{"prompt": f"Answer {i} in JSON:"} for i in range(3)]
    params = [_json(SCHEMAS[name], temperature=0) for name in ("nested", "array", "pattern")]
    params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))  # a free one beside them
    prompts.append({"prompt": "Free:"})
    texts, deferred = [], []
    for async_scheduling in (False, True):
        llm = LLM(model=model, device="cpu", max_model_len=512, seed=0, tensor_parallel_size=2,
                  async_scheduling=async_scheduling)
        try:
            seen = _steps_in_flight(llm)
            texts.append(_texts(llm, prompts, params))
            deferred.append(len(seen["sampled_later"]))
        finally:
            llm.shutdown()
    assert texts[1] == texts[0]
    assert deferred[0] == 0 and deferred[1] > 0


def test_a_step_failing_with_the_next_in_flight_leaves_later_runs_their_own_tokens(model_dir):
    """A step that fails after the next one was launched drops that one (its run is aborted);
    the ranks must not hand its tokens to the next run's first step."""
    prompts = [{"prompt_token_ids": [3, 4, 5, i]} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected_llm = _llm(model_dir, False, tensor_parallel_size=2)
    expected = [o.outputs[0].token_ids for o in expected_llm.generate(prompts, params, use_tqdm=False)]
    expected_llm.shutdown()
    llm = _llm(model_dir, True, tensor_parallel_size=2)
    try:
        seen = _steps_in_flight(llm)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        update, reads = scheduler.update_from_output, []

        def failing_third_read(*args):
            reads.append(1)
            if len(reads) == 3:
                raise RuntimeError("injected failure")
            return update(*args)

        scheduler.update_from_output = failing_third_read
        with pytest.raises(RuntimeError, match="injected failure"):
            llm.generate(prompts, params, use_tqdm=False)
        assert seen["in_flight"][-1] == 1  # the step launched before the failed read is still in the ranks
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == expected


def test_a_worker_killed_with_steps_in_flight_ends_the_run_naming_the_rank(model_dir):
    llm = LLM(model=model_dir, device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2,
              async_scheduling=True)
    try:
        seen = _steps_in_flight(llm)
        worker = executor_of(llm)._procs[1]
        prompts = [{"prompt_token_ids": [3, 4, 5, i]} for i in range(4)]
        error = run_until_killed(llm, prompts, lambda: os.kill(worker.pid, signal.SIGKILL))
        # Whichever the engine notices first: rank 1's death, or rank 0's collective failing without it.
        assert re.search("worker rank (1 died|0 failed)", str(error)), str(error)
        assert max(seen["in_flight"]) == 2
        with pytest.raises(RuntimeError, match="stopped"):
            llm.generate(prompts[0], use_tqdm=False)
    finally:
        llm.shutdown()
    assert not worker.is_alive()


@pytest.mark.parametrize("layout", [{}, {"tensor_parallel_size": 2}], ids=["tp1", "tp2"])
def test_overlapped_steps_on_ray_actors_match_one_step_at_a_time(ray_cluster, model_dir, layout):
    _run_both_ways(model_dir, distributed_executor_backend="ray", **layout)


def test_a_ray_actor_killed_with_steps_in_flight_ends_the_run_naming_the_rank_and_node(ray_cluster, model_dir):
    import ray

    from tests.ray_cluster import all_cpus_free
    from tests.test_ray_executor import _names_a_rank_and_its_node

    llm = LLM(model=model_dir, device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2,
              distributed_executor_backend="ray", async_scheduling=True)
    try:
        seen = _steps_in_flight(llm)
        executor = executor_of(llm)
        nodes = {rank: address for rank, (address, _) in enumerate(executor._nodes)}
        prompts = [{"prompt_token_ids": [3, 4, 5, i]} for i in range(4)]
        error = run_until_killed(llm, prompts, lambda: ray.kill(executor._actors[1]))
        assert _names_a_rank_and_its_node(error, nodes, dead=1), str(error)
        assert max(seen["in_flight"]) == 2
    finally:
        llm.shutdown()
    assert all_cpus_free()


GPU_ENGINES = {
    "ray-tp1": {"distributed_executor_backend": "ray"},
    "mp-tp2": {"tensor_parallel_size": 2},
    "mp-pp2": {"pipeline_parallel_size": 2},
}


@pytest.mark.gpu
@pytest.mark.parametrize("engine", GPU_ENGINES.values(), ids=GPU_ENGINES.keys())
def test_overlapped_steps_on_gpu_ranks_match_one_step_at_a_time(tmp_path, engine):
    """The same batches either way (stops by length only), so the same tokens, bit for bit; the
    samples that the next step reads cross to the other ranks over NCCL."""
    ranks = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
    if not torch.cuda.is_available() or torch.cuda.device_count() < ranks:
        pytest.skip("needs as many CUDA GPUs as ranks")
    if "distributed_executor_backend" in engine:
        pytest.importorskip("ray", reason="pip install 'pagoda[ray]'")
    path = save_tiny_model("llama3", tmp_path)
    prompts, params = _mixed_requests(24)
    tokens, in_flight = [], []
    for overlap in (False, True):
        llm = LLM(model=str(path), device="cuda", dtype="float32", skip_tokenizer_init=True,
                  gpu_memory_utilization=0.2, max_model_len=256, max_num_seqs=32, async_scheduling=overlap,
                  max_num_batched_tokens=128, **engine)
        try:
            seen = _steps_in_flight(llm)
            tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            in_flight.append(max(seen["in_flight"], default=0))
        finally:
            llm.shutdown()
        del llm
        gc.collect()
    assert tokens[1] == tokens[0]
    assert in_flight == [0, 2]
