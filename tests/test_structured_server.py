"""Structured outputs through the OpenAI API: `response_format` (json_object, json_schema) on chat
and completions, vLLM's `guided_*` extras and `structured_outputs` object, streamed or whole; the
official client's `chat.completions.parse` on the default model; bad constraints are 400s that
name the parameter, and the server goes on."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.serving import MODEL, openai_error, serving, tiny_model_args
from tests.test_structured_outputs import SCHEMAS

PROMPT = "Answer in JSON:"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("structured-server")
    with serving(tiny_model_args(directory), directory / "server.log") as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60.0, max_retries=0)


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=60.0) as c:
        yield c


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", ["enum", "pattern"])
def test_chat_response_format_json_schema(client, name):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=_schema_format(name), temperature=0, max_tokens=200,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_completions_json_schemas_at_temperature_1(client):
    """Every sample of every schema validates; compact JSON so that a random model ends in time."""

    def complete(schema: dict):
        return client.completions.create(
            model=MODEL, prompt=PROMPT, temperature=1.0, n=3, seed=3, max_tokens=200,
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
        )

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one batch in the engine
        replies = list(pool.map(complete, SCHEMAS.values()))
    for (name, schema), reply in zip(SCHEMAS.items(), replies):
        for choice in reply.choices:
            assert choice.finish_reason == "stop", (name, choice.text)
            jsonschema.validate(json.loads(choice.text), schema)


def test_completions_response_format_and_length_cut(client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
        extra_body={"response_format": _schema_format("nested")},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.text.startswith("{")
    assert reply.usage.completion_tokens == 3


def test_guided_choice_regex_grammar(client):
    choices = ["alpha", "beta", "gamma"]
    picked = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=6, temperature=1.0, seed=5, max_tokens=20,
        extra_body={"guided_choice": choices},
    )
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in picked.choices)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    matched = client.completions.create(
        model=MODEL, prompt=PROMPT, n=4, temperature=1.0, seed=6, max_tokens=20, extra_body={"guided_regex": pattern},
    )
    assert all(re.fullmatch(pattern, c.text) for c in matched.choices), [c.text for c in matched.choices]
    grammar = 'root ::= "x" ("y" | "z")+ "."'
    derived = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=1.0, seed=7, max_tokens=30, extra_body={"guided_grammar": grammar},
    )
    text = derived.choices[0].text
    assert derived.choices[0].finish_reason == "length" or re.fullmatch(r"x[yz]+\.", text), text


def test_streamed_text_follows_the_grammar(client):
    pattern = r"[a-c]{3}[0-9]{2}"
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=1.0, seed=8, max_tokens=20, stream=True,
        extra_body={"guided_regex": pattern},
    )
    assert re.fullmatch(pattern, "".join(chunk.choices[0].text for chunk in stream))


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),  # not enforceable
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "[a-z"}, "guided_regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
])
def test_bad_constraints_are_400s(http, body, param):
    for path, fields in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": PROMPT})):
        openai_error(http.post(path, json={"model": MODEL, "max_tokens": 2, **fields, **body}), 400, param)
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


class City(pydantic.BaseModel):
    # No number: greedy digits of the 135M default model can repeat to the token limit, and which
    # way its near-ties fall moves with its int8 activations' rounding (AVX2).
    name: str
    country: str


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city", "days"], "additionalProperties": False},
}}


@pytest.mark.slow
def test_parse_and_required_tool_calls_on_the_default_model(tmp_path):
    with serving(["--max-model-len", "1024"], tmp_path / "server.log") as (_, url):
        default = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120.0, max_retries=0)
        model = default.models.list().data[0].id
        reply = default.chat.completions.parse(
            model=model, temperature=0, max_tokens=60, response_format=City,
            messages=[{"role": "user", "content": "Describe Paris as JSON with its name and country."}],
        )
        ask = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
        choices = [
            default.chat.completions.create(
                model=model, messages=ask, tools=[WEATHER_TOOL], tool_choice=tool_choice, temperature=1.0, seed=0,
                max_tokens=120,
            ).choices[0]
            for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}})
        ]
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name, reply
    # The constraint makes the arguments valid whatever the model samples.
    for choice in choices:
        assert choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
