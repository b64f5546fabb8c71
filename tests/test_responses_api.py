"""POST /v1/responses through `pagoda serve` on a tiny random llama, driven by the official openai
client's `client.responses.create` (whole and streamed) and raw httpx: replies (and their
logprobs, and truncation "auto") equal to the chat route's for the same conversation,
previous_response_id, the bounded store, and 400s that name the field."""

from __future__ import annotations

import openai
import pytest

from pagoda.entrypoints.openai.protocol_responses import ResponseObject
from pagoda.entrypoints.openai.response_store import ResponseStore
from tests.serving import MAX_MODEL_LEN, MODEL, openai_error, served, tiny_model_args

GREEDY = {"temperature": 0.0}
MAX_STORED = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("responses")
    args = [*tiny_model_args(directory), "--max-stored-responses", str(MAX_STORED)]
    with served(args, directory / "server.log") as base:
        yield base


def _chat(client: openai.OpenAI, messages: list[dict], max_tokens: int):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **GREEDY)


def test_text_input_with_instructions_is_the_chat_reply(client):
    response = client.responses.create(
        model=MODEL, input="Tell me a story", instructions="Be brief.", max_output_tokens=6, **GREEDY
    )
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}], 6)
    assert response.object == "response" and response.model == MODEL
    assert response.output_text == chat.choices[0].message.content
    assert [item.type for item in response.output] == ["message"]
    assert response.output[0].role == "assistant" and response.output[0].content[0].type == "output_text"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief." and response.max_output_tokens == 6
    # A reply cut by max_output_tokens is incomplete, as OpenAI's is.
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed"


def test_message_list_input_is_the_chat_reply(client):
    messages = [
        {"role": "developer", "content": "You answer."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "user", "content": "Again"},
    ]
    response = client.responses.create(model=MODEL, input=messages, max_output_tokens=5, **GREEDY)
    chat = _chat(client, [
        {"role": "system", "content": "You answer."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"},
    ], 5)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_sampling_fields_reach_the_engine(client):
    sampled = dict(model=MODEL, input="Once", max_output_tokens=8, temperature=1.0, top_p=0.9,
                   extra_body={"seed": 7, "top_k": 20})
    first = client.responses.create(**sampled)
    again = client.responses.create(**sampled)
    assert first.output_text == again.output_text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Once"}], max_tokens=8, temperature=1.0, top_p=0.9,
        seed=7, extra_body={"top_k": 20},
    )
    assert first.output_text == chat.choices[0].message.content
    assert first.temperature == 1.0 and first.top_p == 0.9


def test_streamed_events(client):
    whole = client.responses.create(model=MODEL, input="Stream me", max_output_tokens=6, store=False, **GREEDY)
    events = list(client.responses.create(model=MODEL, input="Stream me", max_output_tokens=6, stream=True,
                                          store=False, **GREEDY))
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    ]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert types == types[:4] + ["response.output_text.delta"] * len(deltas) + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.id == events[-1].response.id
    text = "".join(event.delta for event in deltas)
    assert text == whole.output_text == events[-1].response.output_text
    item_id = events[2].item.id
    assert {event.item_id for event in deltas} == {item_id} and events[-2].item.id == item_id
    assert events[-4].text == text and events[-2].item.content[0].text == text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def _logprobs(tokens) -> list[tuple]:
    """Logprobs (SDK objects or dicts) as (token, logprob, top (token, logprob) pairs), the logprobs
    to within batching's rounding."""
    rows = [token if isinstance(token, dict) else token.model_dump() for token in tokens]
    return [(row["token"], pytest.approx(row["logprob"], abs=1e-4),
             [(top["token"], pytest.approx(top["logprob"], abs=1e-4)) for top in row["top_logprobs"]])
            for row in rows]


def test_output_text_logprobs_are_the_chat_routes(client):
    include = ["message.output_text.logprobs"]
    request = dict(model=MODEL, input="Log me", max_output_tokens=6, include=include, top_logprobs=3, **GREEDY)
    response = client.responses.create(**request)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Log me"}],
                                          max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    expected = chat.choices[0].logprobs.content
    assert len(expected) == response.usage.output_tokens == 6 and all(len(t.top_logprobs) == 3 for t in expected)
    part = response.output[0].content[0]
    assert _logprobs(part.logprobs) == _logprobs(expected)
    assert [token.bytes for token in part.logprobs] == [token.bytes for token in expected]
    assert response.top_logprobs == 3
    # Streamed, the text deltas carry them in order, and the text's done event and the response all.
    events = list(client.responses.create(stream=True, store=False, **request))
    streamed = [lp for event in events if event.type == "response.output_text.delta" for lp in event.logprobs]
    assert len(expected) - 1 <= len(streamed)  # a last token that makes no text yet has no delta
    assert _logprobs(streamed) == _logprobs(expected[:len(streamed)])
    done = next(event for event in events if event.type == "response.output_text.done")
    assert _logprobs(done.logprobs) == _logprobs(expected)
    assert _logprobs(events[-1].response.output[0].content[0].logprobs) == _logprobs(expected)
    # top_logprobs 0: the chosen tokens' own; without include: none (top_logprobs alone is ignored, as in vLLM).
    own = client.responses.create(**{**request, "top_logprobs": 0}).output[0].content[0].logprobs
    assert _logprobs(own) == [(token, logprob, []) for token, logprob, _ in _logprobs(expected)]
    assert client.responses.create(**{**request, "include": []}).output[0].content[0].logprobs == []


def test_truncation_auto_drops_the_oldest_tokens(client, http):
    long_input = "old words " * 120 + "the newest words"  # a token a byte: past the context
    body = {"model": MODEL, "input": long_input, "max_output_tokens": 4, **GREEDY}
    openai_error(http.post("/v1/responses", json=body), 400, "input")  # truncation "disabled", the default
    response = client.responses.create(**body, truncation="auto")
    assert response.truncation == "auto" and response.usage.input_tokens == MAX_MODEL_LEN - 4
    # The chat route's reply to the conversation's last tokens, as many as leave room for the output.
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": long_input}], max_tokens=4,
        extra_body={"truncate_prompt_tokens": MAX_MODEL_LEN - 4}, **GREEDY,
    )
    assert chat.usage.prompt_tokens == MAX_MODEL_LEN - 4 and response.output_text == chat.choices[0].message.content
    # A prompt that fits is as it was.
    short = client.responses.create(model=MODEL, input="short", max_output_tokens=4, truncation="auto", **GREEDY)
    plain = client.responses.create(model=MODEL, input="short", max_output_tokens=4, **GREEDY)
    assert short.usage.input_tokens == plain.usage.input_tokens and short.output_text == plain.output_text


def test_unsupported_include_values_are_named(http):
    body = {"model": MODEL, "input": "x", "include": ["message.output_text.logprobs", "file_search_call.results"]}
    error = openai_error(http.post("/v1/responses", json=body), 400, "include")
    assert "file_search_call.results" in error["message"]


def test_previous_response_id_continues_the_conversation(client, http):
    first = client.responses.create(model=MODEL, input="First", instructions="Only here.", max_output_tokens=4,
                                    **GREEDY)
    second = client.responses.create(model=MODEL, input="Second", previous_response_id=first.id,
                                     max_output_tokens=4, **GREEDY)
    # The instructions do not carry over to the next response, as in OpenAI's API.
    chat = _chat(client, [
        {"role": "user", "content": "First"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Second"},
    ], 4)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.previous_response_id == first.id
    # A streamed continuation, and one of that: three turns deep.
    events = list(client.responses.create(model=MODEL, input="Third", previous_response_id=second.id,
                                          max_output_tokens=4, stream=True, **GREEDY))
    third = events[-1].response
    chat = _chat(client, [
        {"role": "user", "content": "First"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Second"}, {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Third"},
    ], 4)
    assert third.output_text == chat.choices[0].message.content
    retrieved = client.responses.retrieve(third.id)
    assert retrieved.output_text == third.output_text and retrieved.id == third.id


def test_unstored_and_evicted_responses_are_not_found(client, http):
    unstored = client.responses.create(model=MODEL, input="x", max_output_tokens=1, store=False)
    assert unstored.store is False
    body = {"model": MODEL, "input": "y", "max_output_tokens": 1, "previous_response_id": unstored.id}
    openai_error(http.post("/v1/responses", json=body), 404, "previous_response_id")
    openai_error(http.get(f"/v1/responses/{unstored.id}"), 404, "response_id")
    stored = [client.responses.create(model=MODEL, input="z", max_output_tokens=1).id for _ in range(MAX_STORED + 1)]
    # At most --max-stored-responses are kept: the oldest went.
    openai_error(http.get(f"/v1/responses/{stored[0]}"), 404, "response_id")
    openai_error(http.post("/v1/responses", json={**body, "previous_response_id": stored[0]}), 404,
                 "previous_response_id")
    assert all(http.get(f"/v1/responses/{response_id}").status_code == 200 for response_id in stored[1:])


def test_store_bounds_count_and_time():
    now = [0.0]
    store = ResponseStore(max_count=2, ttl=10.0, clock=lambda: now[0])
    for i in range(3):
        store.put(ResponseObject(id=f"r{i}", status="completed", model=MODEL), [])
        now[0] += 4.0
    assert store.get("r0") is None and store.get("r1") is not None and len(store) == 2
    now[0] = 4.0 + 10.0  # r1 was stored at 4 s
    assert store.get("r1") is None and store.get("r2") is not None
    now[0] = 8.0 + 10.0
    assert store.get("r2") is None and len(store) == 0
    disabled = ResponseStore(max_count=0, ttl=10.0)
    disabled.put(ResponseObject(id="r", status="completed", model=MODEL), [])
    assert not disabled.enabled and disabled.get("r") is None


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),  # no call_id
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"content": "no role"}]}, "input"),
    ({"input": "x", "instructions": 3}, "instructions"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": MAX_MODEL_LEN}, "input"),  # past the context: names the input
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "top_p": 1.5}, "top_p"),
    ({"input": "x", "top_k": -5}, "top_k"),
    ({"input": "x", "seed": 2**64}, "seed"),
    ({"input": "x", "stop": 3}, "stop"),
    ({"input": "x", "store": [1]}, "store"),
    ({"input": "x", "stream": "yes please"}, "stream"),
    ({"input": "x", "previous_response_id": 12}, "previous_response_id"),
    ({"input": "x", "truncation": "sometimes"}, "truncation"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),  # function tools only
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),  # no name
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),  # only the logprobs are served
    ({"input": "x", "include": ["message.output_text.logprobs", "no.such.thing"]}, "include"),
    ({"input": "x", "include": "message.output_text.logprobs"}, "include"),  # a list
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),  # OpenAI's 0-20
    ({"input": "x", "top_logprobs": -1}, "top_logprobs"),
    ({"input": "x", "background": True, "store": False}, "background"),  # nowhere to keep it
    ({"input": "x", "background": "later"}, "background"),
    ({"input": "x", "model": "nope"}, "model"),
])
def test_bad_requests_name_the_field(http, body, param):
    status = 404 if param == "model" else 400
    openai_error(http.post("/v1/responses", json={"max_output_tokens": 1, **body}), status, param)


def test_after_bad_requests_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input="x", max_output_tokens=1, temperature=-2)
    assert raised.value.body["param"] == "temperature"
    assert client.responses.create(model=MODEL, input="still here", max_output_tokens=1, store=False).status
