"""--distributed-executor-backend ray on a local Ray cluster on the CPU (gloo): the same greedy
tokens as one process at TP=2 and PP=2; a rank whose actor dies fails the step with an error
naming the rank and its node, and the engine refuses further steps. Skipped without Ray."""

from __future__ import annotations

import random
import time

import pytest

from pagoda import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

ray = pytest.importorskip("ray", reason="pip install 'pagoda[ray]'")

VOCAB = 251
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module: Ray takes seconds to start."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model("llama3", tmp_path_factory.mktemp("ray"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    rng = random.Random(3)
    return [{"prompt_token_ids": [rng.randrange(2, VOCAB) for _ in range(n)]} for n in (3, 21, 40)]


def _llm(model, **parallel) -> LLM:
    return LLM(model=str(model), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, block_size=4,
               **parallel)


def _greedy(model, prompts, **parallel) -> list[list[int]]:
    llm = _llm(model, **parallel)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def _all_cpus_free() -> bool:
    """Whether the cluster got every CPU back (Ray frees a removed placement group's bundles soon after)."""
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU") == 4


def _actors(llm: LLM) -> list:
    return llm.llm_engine.engine_core.engine_core.executor._actors


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_ray_ranks_generate_the_tokens_of_one_process(ray_cluster, model, prompts, layout):
    expected = _greedy(model, prompts)
    got = _greedy(model, prompts, distributed_executor_backend="ray", **layout)
    assert got == expected
    assert _all_cpus_free()  # shutdown removed the placement group


def test_a_dead_rank_actor_fails_the_step_naming_the_rank_and_node(ray_cluster, model, prompts):
    llm = _llm(model, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        llm.generate(prompts[0], GREEDY, use_tqdm=False)  # the cluster serves before the rank dies
        ray.kill(_actors(llm)[1])
        # Whichever the engine notices first: rank 1's death, or rank 0's collective failing without it.
        with pytest.raises(RuntimeError, match=r"worker rank (1 on node \S+ died|0 on node \S+ failed)"):
            llm.generate(prompts[0], GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="stopped"):
            llm.generate(prompts[0], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert _all_cpus_free()
