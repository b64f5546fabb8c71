"""POST /v1/responses with background true through `pagoda serve` on a tiny random llama, driven by
the official openai client (create, retrieve, cancel, delete): the response generated after the
POST answers, its status as it goes, cancellation that stops its engine request, its events
streamed and replayed, DELETE, and the server's shutdown with one under way; in process, a
background response that fails and one the server's shutdown cancels."""

from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.protocol_responses import ResponsesRequest
from pagoda.entrypoints.openai.response_store import ResponseStore
from pagoda.entrypoints.openai.serving_chat import ChatRun
from pagoda.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagoda.entrypoints.openai.tool_choice import ToolCalling
from tests.serving import API_KEY, MAX_MODEL_LEN, MODEL, openai_client, openai_error, served, serving, \
    tiny_model_args

GREEDY = {"temperature": 0.0}
# Far more tokens than a cancelled response gets to: the tiny model makes about a thousand a second.
LONG = {"max_output_tokens": MAX_MODEL_LEN - 64, "extra_body": {"ignore_eos": True}}
UNDER_WAY = ("queued", "in_progress")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("responses-background")
    with served(tiny_model_args(directory), directory / "server.log") as base:
        yield base


def _ended(client: openai.OpenAI, response_id: str, timeout: float = 60.0) -> tuple[object, list[str]]:
    """The response once it is no longer under way, and the statuses GET showed until then."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        seen.append(response.status)
        if response.status not in UNDER_WAY:
            return response, seen
        time.sleep(0.02)
    raise AssertionError(f"response still {seen[-1]} after {timeout} s")


def _metric(http, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"no {name} {labels} in /metrics")


def _aborted(http) -> float:
    return _metric(http, "pagoda:request_success_total", finished_reason="abort")


def _engine_idle(http, aborted_before: float, timeout: float = 10.0) -> float:
    """The generated-token total once the engine core has answered the abort of one more request
    (every token it made for that request has been counted by then: its outputs come first) and
    no engine request runs or waits. The gauges alone may be older than the request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        idle = _metric(http, "pagoda:num_requests_running") == 0 == _metric(http, "pagoda:num_requests_waiting")
        if idle and _aborted(http) == aborted_before + 1:
            return _metric(http, "pagoda:generation_tokens_total")
        time.sleep(0.05)
    raise AssertionError("the engine request was not aborted, or requests still run")


def test_background_response_is_generated_after_the_post(client):
    request = dict(model=MODEL, input="Tell me more", max_output_tokens=300, extra_body={"ignore_eos": True},
                   **GREEDY)
    started = client.responses.create(background=True, **request)
    assert started.status == "queued" and started.background is True and started.output == []
    assert started.usage is None
    final, seen = _ended(client, started.id)
    assert "in_progress" in seen and seen[-1] == "incomplete"  # cut by max_output_tokens, as asked
    assert set(seen[:-1]) <= set(UNDER_WAY)
    whole = client.responses.create(store=False, **request)
    assert final.output_text == whole.output_text and final.usage.output_tokens == 300 == whole.usage.output_tokens
    assert final.id == started.id and final.created_at == started.created_at and final.background is True
    # A stored background response continues a conversation as any other does.
    follow = client.responses.create(model=MODEL, input="And?", previous_response_id=final.id, max_output_tokens=2)
    assert follow.usage.input_tokens > final.usage.input_tokens + 300


def test_cancel_stops_the_engine_request(client, http):
    asked, aborted = LONG["max_output_tokens"], _aborted(http)
    started = client.responses.create(model=MODEL, input="Go on", background=True, **LONG, **GREEDY)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.id == started.id
    assert cancelled.usage.output_tokens < asked
    generated = _engine_idle(http, aborted)
    time.sleep(0.3)
    assert _metric(http, "pagoda:generation_tokens_total") == generated  # nothing goes on generating
    retrieved = client.responses.retrieve(started.id)
    assert retrieved.status == "cancelled" and retrieved.usage.output_tokens == cancelled.usage.output_tokens
    assert retrieved.output_text == cancelled.output_text
    # Once ended, it cannot be cancelled again, as OpenAI and vLLM answer.
    openai_error(http.post(f"/v1/responses/{started.id}/cancel"), 400, "response_id")


def test_only_a_background_response_under_way_can_be_cancelled(client, http):
    whole = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    error = openai_error(http.post(f"/v1/responses/{whole.id}/cancel"), 400, "response_id")
    assert whole.status in error["message"]
    background = client.responses.create(model=MODEL, input="x", max_output_tokens=2, background=True)
    _ended(client, background.id)
    openai_error(http.post(f"/v1/responses/{background.id}/cancel"), 400, "response_id")
    openai_error(http.post("/v1/responses/resp-nope/cancel"), 404, "response_id")
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp-nope")


def test_streamed_background_events_replay_from_any_point(client, http):
    request = dict(model=MODEL, input="Stream it", max_output_tokens=8, **GREEDY)
    events = list(client.responses.create(background=True, stream=True, **request))
    whole = client.responses.create(store=False, **request)
    assert events[0].type == "response.created" and events[-1].type == f"response.{whole.status}"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].response.output_text == whole.output_text
    response_id = events[0].response.id
    assert client.responses.retrieve(response_id).output_text == whole.output_text
    replayed = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [event.model_dump() for event in replayed] == [event.model_dump() for event in events[3:]]
    assert len(list(client.responses.retrieve(response_id, stream=True))) == len(events)
    # Only a streamed background response has events to stream again.
    plain = client.responses.create(background=True, **request)
    _ended(client, plain.id)
    openai_error(http.get(f"/v1/responses/{plain.id}", params={"stream": "true"}), 400, "stream")


def test_delete_forgets_the_response(client, http):
    stored = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    deleted = http.delete(f"/v1/responses/{stored.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": stored.id, "object": "response.deleted",
                                                             "deleted": True}
    openai_error(http.get(f"/v1/responses/{stored.id}"), 404, "response_id")
    openai_error(http.delete(f"/v1/responses/{stored.id}"), 404, "response_id")
    body = {"model": MODEL, "input": "y", "max_output_tokens": 1, "previous_response_id": stored.id}
    openai_error(http.post("/v1/responses", json=body), 404, "previous_response_id")
    # One under way is cancelled first: its engine request goes too.
    aborted = _aborted(http)
    running = client.responses.create(model=MODEL, input="Go on", background=True, **LONG)
    assert client.responses.delete(running.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)
    generated = _engine_idle(http, aborted)
    time.sleep(0.3)
    assert _metric(http, "pagoda:generation_tokens_total") == generated


def test_shutdown_does_not_wait_for_a_background_response(tmp_path):
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log", {"PAGODA_API_KEY": API_KEY}) as (proc, base):
        client = openai_client(base)
        # Enough tokens to outlast the shutdown by far, were it waited for.
        long = dict(max_output_tokens=MAX_MODEL_LEN - 64, extra_body={"ignore_eos": True})
        started = [client.responses.create(model=MODEL, input="Go on", background=True, **long) for _ in range(4)]
        assert all(response.status in UNDER_WAY for response in started)
        begun = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - begun < 15


class _Engine:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids


def _serving(outputs) -> tuple[OpenAIServingResponses, _Engine]:
    """The Responses handler on a chat route whose one engine request yields `outputs` (an async
    generator); the store keeps everything."""
    engine = _Engine()

    async def start(request: ChatCompletionRequest, prefix: str) -> ChatRun:
        return ChatRun(f"{prefix}-1", [f"{prefix}-1-0"], [1, 2], 1, outputs, "assistant", "",
                       ToolCalling(None, None, None))

    chat = SimpleNamespace(start=start, engine=engine, config=SimpleNamespace(max_model_len=MAX_MODEL_LEN),
                           splitter=lambda request: None, model_name=MODEL)
    return OpenAIServingResponses(chat, ResponseStore(max_count=10, ttl=60.0)), engine


def test_a_failed_background_response_is_stored_as_failed():
    async def failing():
        raise RuntimeError("the engine broke")
        yield  # an async generator

    async def scenario():
        responses, engine = _serving(failing())
        started = await responses.create(ResponsesRequest(input="x", background=True))
        assert started.status == "queued"
        while responses.retrieve(started.id).status in UNDER_WAY:
            await asyncio.sleep(0.01)
        failed = responses.retrieve(started.id)
        assert failed.status == "failed" and failed.error["code"] == "server_error"
        assert "RuntimeError" in failed.error["message"]
        assert engine.aborted == ["resp-1-0"]  # its engine request is aborted, however it ended

    asyncio.run(scenario())


def test_the_servers_shutdown_cancels_background_responses():
    async def endless():
        await asyncio.Event().wait()
        yield  # an async generator

    async def scenario():
        responses, engine = _serving(endless())
        started = await responses.create(ResponsesRequest(input="x", background=True))
        await asyncio.sleep(0.05)
        assert responses.retrieve(started.id).status == "in_progress"
        await asyncio.wait_for(responses.shutdown(), 5)
        assert responses.retrieve(started.id).status == "cancelled" and engine.aborted == ["resp-1-0"]

    asyncio.run(scenario())
