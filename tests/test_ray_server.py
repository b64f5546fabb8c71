"""`pagoda serve --distributed-executor-backend ray` on a local Ray cluster of two simulated nodes
answers through the `openai` client with one process's greedy tokens; with --data-parallel-size 2
Ray places the replicas' ranks on different nodes; and a server whose rank dies
(a Ray actor, or a worker process of the multiprocess executor) fails the requests in flight and
exits nonzero, naming the rank, rather than hanging or serving on with no ranks (vLLM's engine
core dies with its executor the same way). Skipped without Ray."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from pagoda import LLM, SamplingParams
from tests.serving import (
    MODEL,
    descendants,
    engine_core_pid,
    openai_client,
    serving,
    tiny_model_args,
)

ray = pytest.importorskip("ray", reason="pip install 'pagoda[ray]'")

from tests.ray_cluster import (  # needs Ray: after the skip
    rank_actor_nodes,
    rank_actor_pids,
    two_node_cluster,
)

PROMPT = "across two nodes"
EXIT_BOUND_S = 60  # the server must have exited by then after a rank dies


@pytest.fixture(scope="module")
def ray_address():
    with two_node_cluster() as cluster:
        yield cluster.address


def _ray_server(model_args: list[str], log: Path, ray_address: str, parallel: list[str]):
    args = [*model_args, *parallel, "--distributed-executor-backend", "ray"]
    return serving(args, log, {"PAGODA_API_KEY": "test-key", "RAY_ADDRESS": ray_address})


def test_ray_server_answers_through_the_openai_client(tmp_path, ray_address):
    model_args = tiny_model_args(tmp_path)
    with _ray_server(model_args, tmp_path / "server.log", ray_address, ["--tensor-parallel-size", "2"]) as (_, base):
        completion = openai_client(base).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0)
    one = LLM(model=model_args[0], device="cpu", max_model_len=1024)
    try:
        (expected,) = one.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    finally:
        one.shutdown()
    assert completion.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert completion.choices[0].text == expected.outputs[0].text


def test_data_parallel_replicas_place_their_ranks_on_different_nodes(tmp_path, ray_address):
    """--data-parallel-size 2 on Ray: an engine core a replica, each core's rank placed by Ray; one
    CPU a node, so the replicas' ranks are on the two nodes; the server answers."""
    model_args = tiny_model_args(tmp_path)
    with _ray_server(model_args, tmp_path / "server.log", ray_address, ["--data-parallel-size", "2"]) as (_, base):
        nodes = rank_actor_nodes()
        client = openai_client(base)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            completions = list(pool.map(
                lambda i: client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=4, temperature=0.0),
                range(4),
            ))
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert all(c.usage.completion_tokens == 4 for c in completions)


def _worker_pids(server_pid: int) -> list[int]:
    """The multiprocess executor's workers: the processes the engine core spawned."""
    core = engine_core_pid(server_pid)
    return [pid for pid in descendants(core) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _long_completion(base: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": "long", "max_tokens": 900, "ignore_eos": True, "temperature": 0.0}
    return httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer test-key"}, timeout=60.0)


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_server_exits_naming_the_rank_when_a_rank_dies(tmp_path, ray_address, backend):
    log = tmp_path / "server.log"
    parallel = ["--tensor-parallel-size", "2"]
    if backend == "ray":
        server = _ray_server(tiny_model_args(tmp_path), log, ray_address, parallel)
    else:
        server = serving([*tiny_model_args(tmp_path), *parallel], log, {"PAGODA_API_KEY": "test-key"})
    with server as (proc, base), concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_long_completion, base)
        time.sleep(2)  # the request is decoding
        ranks = rank_actor_pids() if backend == "ray" else _worker_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(EXIT_BOUND_S)  # bounded: a server that never exits fails the test, not hangs it
        assert in_flight.result(timeout=EXIT_BOUND_S).status_code == 503
    assert proc.returncode != 0
    text = log.read_text()
    assert "ExecutorDeadError: worker rank" in text, text[-3000:]
    assert "engine core 0" in text, text[-3000:]
