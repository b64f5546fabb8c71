"""--distributed-executor-backend ray on a local Ray cluster of two simulated nodes, on the CPU
(gloo): at TP=2 and PP=2 the two ranks land on different nodes and give the same greedy tokens as
one process; a rank whose actor is killed mid-run ends the run, within a bound, with an error
naming the rank and its node, and the engine refuses further steps; so does a node removed mid-run.
Skipped without Ray."""

from __future__ import annotations

import random
import re

import pytest

from pagoda import LLM, SamplingParams
from pagoda.executor.base import ExecutorDeadError
from tests.killed_run import executor_of, run_until_killed
from tests.tiny_models import save_tiny_model

ray = pytest.importorskip("ray", reason="pip install 'pagoda[ray]'")

from tests.ray_cluster import (  # needs Ray: after the skip
    CPUS_PER_NODE,
    all_cpus_free,
    two_node_cluster,
)

VOCAB = 251
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """One cluster for the module: Ray takes seconds to start."""
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model("llama3", tmp_path_factory.mktemp("ray"), vocab_size=VOCAB, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    rng = random.Random(3)
    return [{"prompt_token_ids": [rng.randrange(2, VOCAB) for _ in range(n)]} for n in (3, 21, 40)]


def _llm(model, **parallel) -> LLM:
    return LLM(model=str(model), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, block_size=4,
               **parallel)


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_ray_ranks_on_two_nodes_generate_the_tokens_of_one_process(ray_cluster, model, prompts, layout):
    one = _llm(model)
    try:
        expected = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        one.shutdown()
    llm = _llm(model, distributed_executor_backend="ray", **layout)
    try:
        assert len({node_id for _, node_id in executor_of(llm)._nodes}) == 2  # one CPU a node: one rank a node
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == expected
    assert all_cpus_free()  # shutdown removed the placement group


def _names_a_rank_and_its_node(error: BaseException, nodes: dict[int, str], dead: int) -> bool:
    """Whichever the engine notices first: the dead rank, or the other failing in a collective without it."""
    alive = 1 - dead
    died = rf"worker rank {dead} on node {re.escape(nodes[dead])} \(id \w+\) died"
    failed = rf"worker rank {alive} on node {re.escape(nodes[alive])} \(id \w+\) failed"
    return any(re.search(pattern, str(error)) for pattern in (died, failed))


def test_a_rank_killed_mid_run_ends_it_with_an_error_naming_the_rank_and_node(ray_cluster, model, prompts):
    llm = _llm(model, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        executor = executor_of(llm)
        nodes = {rank: address for rank, (address, _) in enumerate(executor._nodes)}
        error = run_until_killed(llm, prompts, lambda: ray.kill(executor._actors[1]))
        assert _names_a_rank_and_its_node(error, nodes, dead=1), str(error)
        with pytest.raises(ExecutorDeadError, match="stopped"):
            llm.generate(prompts[0], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert all_cpus_free()


def test_a_node_removed_mid_run_ends_it_with_an_error_naming_a_rank_and_node(ray_cluster, model, prompts):
    llm = _llm(model, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        executor = executor_of(llm)
        nodes = {rank: address for rank, (address, _) in enumerate(executor._nodes)}
        (worker_node,) = ray_cluster.worker_nodes
        (dead,) = [rank for rank, (_, node_id) in enumerate(executor._nodes) if node_id == worker_node.node_id]
        error = run_until_killed(llm, prompts, lambda: ray_cluster.remove_node(worker_node))
        assert _names_a_rank_and_its_node(error, nodes, dead), str(error)
    finally:
        llm.shutdown()
        ray_cluster.add_node(num_cpus=CPUS_PER_NODE)  # the module's other tests need two nodes
        ray_cluster.wait_for_nodes()
    assert all_cpus_free()
