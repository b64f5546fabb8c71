"""The engine side must never leave the server hanging: a message that cannot be encoded or sent
fails its request alone; a dead sender thread or engine core process fails every request in
flight, refuses new ones at once, turns /health 503 and makes `pagoda serve` exit nonzero with no
process left behind (tensor-parallel workers included)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from pagoda.config import EngineConfig
from pagoda.engine.async_llm import AsyncLLM, EngineDeadError, RequestAborted
from pagoda.sampling_params import SamplingParams
from tests.serving import MODEL, descendants, engine_core_pid, openai_error, serving, still_alive, tiny_model_args
from tests.tiny_models import save_tiny_model

LONG = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)  # still running when the engine dies
SHORT = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


class _ThreadKiller(BaseException):
    """Not an Exception: what no per-message handler catches, so the sender thread itself ends."""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_tiny_model("llama3", tmp_path_factory.mktemp("death-model"), max_position_embeddings=1024)


def _engine(model_path: Path) -> AsyncLLM:
    return AsyncLLM(EngineConfig(model=str(model_path), device="cpu", skip_tokenizer_init=True, max_model_len=1024))


async def _tokens(engine: AsyncLLM, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
    outputs = await engine.add_request(request_id, prompt, params)
    async for output in outputs:
        last = output
    return last.outputs[0].token_ids


async def _started(engine: AsyncLLM, request_id: str) -> asyncio.Task:
    """A long request, once its first output has come (it is in flight)."""
    outputs = await engine.add_request(request_id, [5, 6, 7], LONG)
    await outputs.__anext__()
    return asyncio.ensure_future(_drain(outputs))


async def _drain(outputs) -> None:
    async for _ in outputs:
        pass


async def _assert_dead(engine: AsyncLLM, in_flight: list[asyncio.Task], deaths: list[EngineDeadError]) -> None:
    """Every request in flight fails, a new one is refused at once, the listener has heard."""
    for task in in_flight:
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(task, 10)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(engine.add_request("after", [5, 6], SHORT), 1)
    assert not engine.is_alive()
    assert len(deaths) == 1


def test_unsendable_requests_fail_alone_and_the_engine_goes_on(model_path, monkeypatch):
    engine = _engine(model_path)

    async def run() -> None:
        expected = await _tokens(engine, "first", [5, 6, 7], SHORT)
        # The front end refuses a token id outside the vocabulary before anything is encoded.
        with pytest.raises(ValueError, match="out of the vocabulary range"):
            await asyncio.wait_for(engine.add_request("wide", [2**64], SHORT), 1)
        # msgpack cannot hold 2**64: the caller hears of it at once, and nothing else changes.
        wide_seed = SamplingParams(seed=1)
        wide_seed.seed = 2**64  # past SamplingParams' own check: the encoder is the last line
        with pytest.raises(ValueError, match="cannot be sent to the engine.*OverflowError"):
            await asyncio.wait_for(engine.add_request("wide-seed", [5], wide_seed), 1)
        assert await _tokens(engine, "second", [5, 6, 7], SHORT) == expected
        # A send that fails in the sender thread fails that request, not the thread.
        send = engine.engine_core.cores.send
        failed_once = []

        def flaky_send(index, data):
            if not failed_once:
                failed_once.append(data)
                raise RuntimeError("injected send failure")
            send(index, data)

        monkeypatch.setattr(engine.engine_core.cores, "send", flaky_send)
        with pytest.raises(RequestAborted, match="injected send failure"):
            await asyncio.wait_for(engine.add_request("unsent", [5, 6, 7], SHORT), 5)
        assert await asyncio.wait_for(_tokens(engine, "third", [5, 6, 7], SHORT), 30) == expected
        assert engine.is_alive()
        assert engine.engine_core.cores.cores[0].outstanding == 0  # the unsent request is not counted as running

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_dead_sender_thread_fails_everything_and_refuses_new_requests(model_path, monkeypatch):
    engine = _engine(model_path)
    deaths: list[EngineDeadError] = []
    engine.dead_listeners.append(deaths.append)

    async def run() -> None:
        in_flight = [await _started(engine, f"long-{i}") for i in range(2)]

        def killing_send(index, data):
            raise _ThreadKiller()

        monkeypatch.setattr(engine.engine_core.cores, "send", killing_send)
        engine.abort()  # its message ends the sender thread
        await _assert_dead(engine, in_flight, deaths)
        assert "sender thread" in str(deaths[0])

    try:
        asyncio.run(run())
    finally:
        core = engine.engine_core.cores.cores[0].process
        engine.shutdown()
    assert not core.is_alive()


def test_killed_engine_core_fails_everything_and_refuses_new_requests(model_path):
    engine = _engine(model_path)
    deaths: list[EngineDeadError] = []
    engine.dead_listeners.append(deaths.append)

    async def run() -> None:
        in_flight = [await _started(engine, f"long-{i}") for i in range(2)]
        os.kill(engine.engine_core.cores.cores[0].process.pid, signal.SIGKILL)
        await _assert_dead(engine, in_flight, deaths)
        assert "engine core 0" in str(deaths[0]) and "SIGKILL" in str(deaths[0])

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


# The server -------------------------------------------------------------------------------------


def _stream(base: str, started: concurrent.futures.Future) -> list[dict | str]:
    """A long streamed completion's events (each a JSON object, or "[DONE]")."""
    body = dict(model=MODEL, prompt="stream on", max_tokens=900, ignore_eos=True, stream=True, temperature=0.0)
    events: list[dict | str] = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30.0) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if not started.done():
                    started.set_result(None)
    return events


def _whole(base: str) -> httpx.Response:
    body = dict(model=MODEL, prompt="whole on", max_tokens=900, ignore_eos=True, temperature=0.0)
    return httpx.post(f"{base}/v1/completions", json=body, timeout=30.0)


def _exit_time(proc) -> float:
    proc.wait(30)  # bounded: a server that never exits fails the test, not hangs it
    return time.monotonic()


def _refused_or_gone(base: str, method: str, path: str, **kwargs) -> None:
    """Right after the engine's death: a 503, or no server any more; never a hang. A server that
    exits while the request is in flight resets the connection: gone, too."""
    try:
        response = httpx.request(method, f"{base}{path}", timeout=10.0, **kwargs)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return
    assert response.status_code == 503, response.text
    if path != "/health":
        openai_error(response, 503)


@pytest.mark.parametrize("parallel", [[], ["--tensor-parallel-size", "2"]], ids=["one-rank", "tp2"])
def test_server_exits_when_its_engine_core_is_killed(tmp_path, parallel):
    log = tmp_path / "server.log"
    with serving([*tiny_model_args(tmp_path), *parallel], log) as (proc, base), \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        starts = [concurrent.futures.Future() for _ in range(3)]
        streams = [pool.submit(_stream, base, started) for started in starts]
        wholes = [pool.submit(_whole, base) for _ in range(3)]
        concurrent.futures.wait(starts, timeout=60)
        assert all(s.done() for s in starts), log.read_text()[-3000:]
        tree = descendants(proc.pid)
        assert len(tree) >= (4 if parallel else 2), tree  # core (+ workers) and a resource tracker
        exit_time = pool.submit(_exit_time, proc)
        os.kill(engine_core_pid(proc.pid), signal.SIGKILL)
        killed = time.monotonic()
        new_request = dict(model=MODEL, prompt="new", max_tokens=4)
        _refused_or_gone(base, "POST", "/v1/completions", json=new_request)
        for whole in wholes:
            openai_error(whole.result(timeout=15), 503)
        for stream in streams:
            events = stream.result(timeout=15)
            assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error", events[-3:]
        # The death is known by now: what comes next must not wait for an engine that is gone.
        _refused_or_gone(base, "POST", "/v1/completions", json=new_request)
        _refused_or_gone(base, "GET", "/health")
        exited = exit_time.result(timeout=15)
    print(f"\nkill to server exit ({'tp2' if parallel else 'one rank'}): {exited - killed:.2f} s")
    assert proc.returncode != 0
    text = log.read_text()
    assert "engine core 0" in text and "SIGKILL" in text, text[-3000:]
    assert not still_alive(tree, 10)


@pytest.mark.parametrize("parallel", [[], ["--data-parallel-size", "2"]], ids=["one-core", "dp2"])
def test_a_killed_front_end_leaves_no_process(tmp_path, parallel):
    """SIGKILL of the server's own process (nothing of it runs any more): its engine cores, forked
    from a fork server that the front end stopped once they ran (adopting them), see it gone and
    exit."""
    with serving([*tiny_model_args(tmp_path), *parallel], tmp_path / "server.log") as (proc, _):
        tree = descendants(proc.pid)
        cores = [pid for pid in tree if Path(f"/proc/{pid}/comm").read_text().startswith("pagoda-core")]
        assert len(cores) == (2 if parallel else 1), tree
        # The fork server is gone, the cores are the front end's children; the rest of the tree
        # is the resource tracker.
        assert [_parent(pid) for pid in cores] == [proc.pid] * len(cores)
        others = [pid for pid in tree if pid not in cores]
        assert all("resource_tracker" in Path(f"/proc/{pid}/cmdline").read_text() for pid in others), others
        proc.kill()
        proc.wait(10)
    assert not still_alive(tree, 15)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
