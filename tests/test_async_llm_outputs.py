"""AsyncLLM's per-request streams: a reader that fell behind the engine gets what queued since its
last turn as one output (the latest, each child's text deltas joined), an error after outputs
still comes after them, the engine's outputs reach the streams in one callback per step, and the
receiver gives freed heap memory back when idle; a step's scheduler stats show once its outputs are applied;
a request whose making can take seconds is made off the event loop."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import zmq

from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.async_llm import AsyncLLM, _Stream
from pagoda.engine.core_client import MPClient
from pagoda.engine.core_group import CoreGroup, _Core
from pagoda.engine.messages import Aborted, Accepted, Outputs, encode
from pagoda.lora.request import LoRARequest
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams


def _output(step: int, deltas: list[str], finished: bool = False) -> RequestOutput:
    children = [CompletionOutput(index=i, text="", token_ids=list(range(step + 1)), cumulative_logprob=None,
                                 logprobs=None, finish_reason="length" if finished else None, text_delta=delta)
                for i, delta in enumerate(deltas)]
    return RequestOutput("r", None, [1, 2], None, children, finished)


def _engine(aborted: list[list[str]]) -> AsyncLLM:
    engine = AsyncLLM.__new__(AsyncLLM)  # only the stream's reader is exercised: no core
    engine._send_abort = aborted.append
    return engine


def test_a_reader_behind_gets_one_output_with_the_deltas_joined():
    async def run() -> list[RequestOutput]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), ["r-0"])
        for step, deltas in enumerate([["a", "x"], ["b", ""], ["c", "y"]]):
            queued.append(_output(step, deltas))
            stream.outputs.put_nowait(queued[-1])
        reader = _engine([])._outputs(stream)
        first = await reader.__anext__()  # three steps queued before the reader's turn
        stream.outputs.put_nowait(_output(3, ["d", "z"], finished=True))
        return [first] + [output async for output in reader]

    queued: list[RequestOutput] = []
    first, last = asyncio.run(run())
    assert [c.text_delta for c in queued[-1].outputs] == ["c", "y"]  # the outputs merged are left as they were
    assert [c.text_delta for c in first.outputs] == ["abc", "xy"]
    assert first.outputs[0].token_ids == [0, 1, 2] and not first.finished  # the latest state
    assert [c.text_delta for c in last.outputs] == ["d", "z"] and last.finished


def test_an_error_queued_after_outputs_comes_after_them():
    aborted: list[list[str]] = []

    async def run() -> tuple[list[str], Exception]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), ["r-0"])
        stream.outputs.put_nowait(_output(0, ["a"]))
        stream.outputs.put_nowait(_output(1, ["b"]))
        stream.outputs.put_nowait(RuntimeError("engine died"))
        seen = []
        with pytest.raises(RuntimeError) as raised:
            async for output in _engine(aborted)._outputs(stream):
                seen.append(output.outputs[0].text_delta)
        return seen, raised.value

    seen, error = asyncio.run(run())
    assert seen == ["ab"] and str(error) == "engine died"
    assert aborted == []  # the error ended the stream: nothing left to abort


def test_a_step_reaches_every_stream_in_one_callback():
    async def run() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        engine = _engine([])
        engine._streams = {f"r{i}": _Stream(loop, asyncio.Queue(), [f"r{i}-0"]) for i in range(3)}
        queues = {rid: s.outputs for rid, s in engine._streams.items()}
        calls = 0
        original = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal calls
            calls += 1
            return original(*args)

        loop.call_soon_threadsafe = counting
        engine._deliver([("r0", _output(0, ["a"]), False), ("r1", _output(0, ["b"]), True), ("r2", _output(0, ["c"]), False)])
        await asyncio.sleep(0)
        return calls, [q.qsize() for q in queues.values()], sorted(engine._streams)

    calls, sizes, left = asyncio.run(run())
    assert calls == 1 and sizes == [1, 1, 1]
    assert left == ["r0", "r2"]  # the final item ended r1's stream


class _ScriptedCore:
    """An engine core client whose get_outputs plays `script` (None: a poll interval with nothing)
    and that ends after it; `before` runs before each message is returned. The receiver asks
    whether the core is alive only after a poll that found nothing."""

    def __init__(self, script: list, before) -> None:
        self.script, self.before = list(script), before

    def alive(self) -> bool:
        return bool(self.script)

    def publish_stats(self) -> None:
        pass

    def get_outputs(self):
        if not self.script:  # the core has ended: its polls find nothing
            return []
        self.before(len(self.script))
        message = self.script.pop(0)
        return [] if message is None else [message]


def test_the_receiver_gives_freed_memory_back_once_idle(monkeypatch):
    # The front end's receiver trims the heap after a quiet poll with no request left, once per
    # quiet spell: not while a request is still streaming, not again until more work came.
    trims: list[int] = []
    monkeypatch.setattr("pagoda.engine.async_llm.release_free_memory", lambda: trims.append(len(core.script)))
    engine = AsyncLLM.__new__(AsyncLLM)
    engine._dead, engine._stopping, engine._pending = None, True, {}
    engine._lock = threading.Lock()
    engine._handle_all = lambda messages: []
    engine._deliver = lambda deliveries: None
    def before(remaining: int) -> None:  # a request streams while the 3rd and 4th polls run
        engine._streams = {"r": object()} if remaining in (5, 4) else {}

    # Polls: idle (the start-up's trim), idle, a message, idle with the request open, idle with it
    # done (a trim), idle, a message; each trim records the polls left after it.
    core = _ScriptedCore([None, None, "output", None, None, None, "output"], before)
    engine.engine_core = core
    engine._receive_loop()
    assert trims == [6, 2]


def test_successive_steps_received_together_are_processed_as_one_batch():
    # Outputs of successive steps that queued while the receiver was busy go through the output
    # processor together (one output per request); any other message keeps its place between them.
    engine = AsyncLLM.__new__(AsyncLLM)
    calls: list = []
    engine._process = lambda steps: calls.append([s.num_batched_tokens for s in steps]) or []
    engine._handle = lambda message: calls.append(type(message).__name__) or []
    stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
    step = lambda n: Outputs([], stats, n)  # noqa: E731
    engine._handle_all([step(1), step(2), Aborted(["r"], stats), step(3), Accepted("s"), step(4), step(5)])
    assert calls == [[1, 2], "Aborted", [3], "Accepted", [4, 5]]


def test_a_steps_scheduler_stats_show_only_once_its_outputs_are_applied(monkeypatch):
    # A /metrics scrape while the receiver applies a step must not see the step's requests gone
    # from the running batch before their tokens are counted; and a stream is handed the step's
    # output only once they show (a client that has read a token then sees its request's stats).
    monkeypatch.setattr("pagoda.engine.async_llm.release_free_memory", lambda: None)
    running, done = SchedulerStats(1, 0, 0.5, 0, 0, 0), SchedulerStats(0, 0, 0.0, 0, 0, 0)
    context = zmq.Context.instance()
    core_end, front_end = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    core_end.bind("inproc://stats-order")
    front_end.connect("inproc://stats-order")
    group = CoreGroup.__new__(CoreGroup)  # one core, its process stood in for: alive until it has sent
    group.cores = [_Core(SimpleNamespace(is_alive=lambda: not sent), None, front_end, stats=running)]
    group._lock, group._poller, group._sockets = threading.Lock(), zmq.Poller(), {front_end: 0}
    group._poller.register(front_end, zmq.POLLIN)
    client = MPClient.__new__(MPClient)
    client.cores, client._unanswered, client._arrived_stats = group, {}, {}
    engine = AsyncLLM.__new__(AsyncLLM)
    engine._dead, engine._stopping, engine._streams, engine.engine_core = None, True, {}, client
    engine._lock, engine._pending = threading.Lock(), {}
    seen: list[int] = []

    def handle_all(messages) -> list:
        seen.append(client.stats.num_running)
        sent.append(True)
        return [("r", "output", False)]

    engine._handle_all = handle_all
    engine._deliver = lambda deliveries: seen.append((client.stats.num_running, deliveries))
    sent: list[bool] = []
    core_end.send(encode(Outputs([], done, 1)))
    try:
        engine._receive_loop()
    finally:
        core_end.close(0)
        front_end.close(0)
    # (then the receiver's end hands every stream still open its error: none here)
    assert seen == [1, (0, [("r", "output", False)]), (0, [])] and client.stats.num_running == 0


@pytest.mark.parametrize("params, extra, off_the_loop", [
    (SamplingParams(), {}, False),  # the common request: no thread hop
    (SamplingParams(), {"images": ["an image"]}, True),  # preprocessed for the model
    (SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)), {}, True),
    (SamplingParams(), {"lora_request": LoRARequest("adapter", 1, "/adapters/a")}, True),
])
def test_a_request_whose_making_can_take_seconds_is_made_off_the_event_loop(params, extra, off_the_loop):
    # Images' preprocessing, a grammar's first check (xgrammar's import brings torch into the
    # server's front end) and an adapter's first reading must not stop the other requests' streams.
    threads: list[threading.Thread] = []

    def make_request(*args, **kwargs):
        threads.append(threading.current_thread())
        raise ValueError("refused")  # before the engine: none is needed

    engine = AsyncLLM.__new__(AsyncLLM)
    engine.processor = SimpleNamespace(make_request=make_request)

    async def add() -> None:
        with pytest.raises(ValueError, match="refused"):
            await engine.add_request("r", [1, 2], params, **extra)

    asyncio.run(add())
    assert (threads[0] is not threading.main_thread()) == off_the_loop
