"""Tools and structured output through POST /v1/responses, driven by the official openai client on a
tiny random llama: text.format (json_schema, json_object) constrains the reply as the chat route's
response_format does; function tools with tool_choice "required" or a named function give
function_call items (whole and streamed with OpenAI's argument events) whose arguments validate;
function_call and function_call_output input items (and a stored response's calls) go back to the
model as the chat route's tool calls and tool messages; bad shapes are 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.serving import MODEL, openai_error, served, tiny_model_args

# ChatML that also writes each call (name, arguments, id) and the call a tool message answers, so
# that a prompt's length shows whether they reached the template.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{{ c['function']['name'] }}({{ c['function']['arguments'] | tojson }})"
    "#{{ c['id'] }}{% endfor %}{% if m.get('tool_call_id') %}#{{ m['tool_call_id'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CITY = {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city", "parameters": CITY}
ANSWER = {
    "type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"], "additionalProperties": False,
}
GREEDY = {"temperature": 0.0, "max_output_tokens": 60}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("responses-tools")
    with served([*tiny_model_args(directory), "--chat-template", TOOL_TEMPLATE], directory / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def compact(http) -> dict:
    """Greedy sampling that never writes whitespace: constrained JSON from a random model otherwise
    tends to fill its tokens with the whitespace JSON allows between tokens."""
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": " \n\r\t", "add_special_tokens": False}).json()
    return {**GREEDY, "extra_body": {"logit_bias": {str(i): -100 for i in ids["tokens"]}}}


def _calls(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


@pytest.mark.parametrize("text_format", [
    {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}, {"type": "json_object"},
])
def test_text_format_constrains_the_reply_as_chat_response_format_does(client, compact, text_format):
    response = client.responses.create(model=MODEL, input="Answer in JSON:", text={"format": text_format}, **compact)
    assert response.status == "completed"
    reply = json.loads(response.output_text)
    if text_format["type"] == "json_schema":
        jsonschema.validate(reply, ANSWER)
        assert response.text.format.name == "answer"
    chat_format = text_format if text_format["type"] == "json_object" else {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Answer in JSON:"}], response_format=chat_format,
        max_tokens=compact["max_output_tokens"], temperature=0.0, extra_body=compact["extra_body"],
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.text.format.type == text_format["type"]


def test_required_tool_choice_gives_function_calls_whose_arguments_validate(client, compact):
    response = client.responses.create(
        model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required", **compact
    )
    calls = _calls(response)
    assert calls and response.status == "completed"
    assert [item.type for item in response.output] == ["function_call"] * len(calls)
    for call in calls:
        assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), CITY)
    assert response.tool_choice == "required" and response.tools[0].name == "get_weather"


def test_named_tool_choice_streamed_with_argument_events(client, compact):
    events = list(client.responses.create(
        model=MODEL, input="Weather?", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
        stream=True, **compact,
    ))
    kinds = [event.type for event in events]
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.name == "get_weather"
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas and "".join(deltas) == done.arguments and done.item_id == added.item.id
    jsonschema.validate(json.loads(done.arguments), CITY)
    assert kinds.index("response.function_call_arguments.done") < kinds.index("response.output_item.done")
    final = events[-1].response
    assert final.status == "completed" and final.output[0].arguments == done.arguments
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_call_output_reaches_the_model_as_the_chat_route_sends_it(client):
    chat_messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": CALL["arguments"]}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT["output"]},
    ]
    chat = client.chat.completions.create(model=MODEL, messages=chat_messages, max_tokens=6, temperature=0.0)
    response = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Weather?"}, CALL, RESULT], tools=[WEATHER],
        tool_choice="none", temperature=0.0, max_output_tokens=6,
    )
    bare = client.responses.create(model=MODEL, input="Weather?", temperature=0.0, max_output_tokens=1)
    assert response.usage.input_tokens == chat.usage.prompt_tokens > bare.usage.input_tokens
    assert response.output_text == chat.choices[0].message.content
    assert _calls(response) == []


def test_a_stored_responses_calls_go_back_with_previous_response_id(client, compact):
    first = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required", **compact)
    call = _calls(first)[0]
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    follow = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=[answer], temperature=0.0, max_output_tokens=1,
    )
    spelled_out = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Weather?"}, *[item.model_dump() for item in _calls(first)],
                            answer], temperature=0.0, max_output_tokens=1,
    )
    assert follow.usage.input_tokens == spelled_out.usage.input_tokens


@pytest.mark.parametrize(("fields", "param"), [
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),  # no schema
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "parameters": CITY}]}, "tools"),  # no name
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"input": [{"type": "function_call", "name": "get_weather", "arguments": "{}"}]}, "input"),  # no call_id
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),  # no call_id
    ({"input": [{**CALL, "arguments": "not json"}, RESULT]}, "input"),
])
def test_bad_shapes_are_400s_naming_the_field(http, fields, param):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **fields}
    openai_error(http.post("/v1/responses", json=body), 400, param)
    assert http.post("/v1/responses", json={"model": MODEL, "input": "ok", "max_output_tokens": 1}).status_code == 200

