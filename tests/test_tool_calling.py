"""Tool calling: the parsers on whole and character-by-character text, the JSON schema that
"required" and named tool_choice constrain output to, and `tools` / `tool_choice` end to end
through the official openai client against servers of a scripted model (tests/scripted_model.py),
whose replies are the tool-call formats written here."""

from __future__ import annotations

import argparse
import contextlib
import json

import httpx
import jsonschema
import openai
import pytest

from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionToolParam,
    NamedToolChoice,
)
from pagoda.entrypoints.openai.server import auto_tool_parser
from pagoda.entrypoints.openai.serving_engine import OpenAIError
from pagoda.entrypoints.openai.tool_choice import tool_calling, tool_choice_json_schema
from pagoda.entrypoints.openai.tool_parsers import (
    ToolCallStream,
    get_tool_parser,
    tool_parser_names,
)
from tests.scripted_model import save_scripted_model
from tests.serving import openai_error, serving

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]

# Two calls and some content, in each parser's format.
TEXTS = {
    "hermes": 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
                   '{"name": "get_time", "parameters": {}}',
    "mistral": 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
               '{"name": "get_time", "arguments": {}}]',
    "mistral-v11": 'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]get_time[ARGS]{}',
}
CONTENT = {"hermes": "Let me check.", "llama3_json": None, "mistral": "Let me check.", "mistral-v11": "Let me check."}
CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]


def _parser(name: str):
    return get_tool_parser(name.removesuffix("-v11"))(tokenizer=None)


def _replay(parser, text: str) -> tuple[str, list[dict]]:
    """Stream `text` one character at a time: the content and the calls a client assembles."""
    stream, content, calls = ToolCallStream(parser), "", []
    for end in range(1, len(text) + 1):
        piece, deltas = stream.step(text[:end], final=end == len(text))
        content += piece or ""
        for delta in deltas:
            if delta.index == len(calls):
                assert delta.id and delta.type == "function" and delta.function.name
                calls.append({"name": delta.function.name, "arguments": "", "pieces": 0})
            else:
                assert delta.id is None and delta.function.name is None, "only the first delta names the call"
            calls[delta.index]["arguments"] += delta.function.arguments
            calls[delta.index]["pieces"] += bool(delta.function.arguments)
    return content, calls


def test_builtin_parsers_are_registered():
    assert {"hermes", "llama3_json", "mistral"} <= set(tool_parser_names())


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_parser_reads_whole_text(name):
    extracted = _parser(name).extract(TEXTS[name])
    assert extracted.content == CONTENT[name]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in extracted.tool_calls] == CALLS
    ids = [c.id for c in extracted.tool_calls]
    assert len(set(ids)) == 2
    if name.startswith("mistral"):
        assert all(len(i) == 9 and i.isalnum() for i in ids)  # Mistral's templates need these
    else:
        assert all(i.startswith("chatcmpl-tool-") for i in ids)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_parser_streams_text_character_by_character(name):
    content, calls = _replay(_parser(name), TEXTS[name])
    assert content == (CONTENT[name] or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == CALLS
    assert calls[0]["pieces"] > 1  # arguments go out as they are written, not at the end


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_text_without_calls_is_content(name):
    parser = _parser(name)
    text = "Paris is sunny today. <tool"  # ends like the start of a marker, but the reply ended
    assert parser.extract(text).content == text and parser.extract(text).tool_calls == []
    assert _replay(parser, text) == (text, [])


@pytest.mark.parametrize("name", ["hermes", "mistral"])
def test_calls_that_do_not_parse_leave_the_text_as_content(name):
    text = TEXTS[name].replace('"Paris"', "Paris")  # not JSON
    extracted = _parser(name).extract(text)
    assert extracted.content == text and extracted.tool_calls == []


def test_marker_split_across_pieces_is_held_back():
    stream = ToolCallStream(_parser("hermes"))
    assert stream.step("Hi <tool_", final=False) == ("Hi ", [])
    content, deltas = stream.step('Hi <tool_call>{"name": "get_time", "arguments": {', final=False)
    assert content is None and [d.function.name for d in deltas] == ["get_time", None]


# The JSON schema of "required" and named tool_choice ---------------------------------------


def _tools(*tools: dict) -> list[ChatCompletionToolParam]:
    return [ChatCompletionToolParam.model_validate(tool) for tool in tools]


def test_required_schema_accepts_calls_of_the_tools_only():
    schema = tool_choice_json_schema(_tools(WEATHER, TIME), "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    valid = [
        [{"name": "get_weather", "parameters": {"city": "Paris"}}],
        [{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}],
    ]
    invalid = [
        [],  # at least one call
        [{"name": "get_weather", "parameters": {}}],  # city is required
        [{"name": "get_weather", "parameters": {"city": 3}}],
        [{"name": "get_news", "parameters": {}}],  # not a tool
        [{"name": "get_time"}],
        {"name": "get_time", "parameters": {}},  # not an array
    ]
    for calls in valid:
        jsonschema.validate(calls, schema)
    for calls in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(calls, schema)


def test_required_schema_moves_defs_to_the_root():
    address = {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]}
    ship = {"type": "function", "function": {"name": "ship", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Address"}}, "required": ["to"],
        "$defs": {"Address": address},
    }}}
    schema = tool_choice_json_schema(_tools(ship, TIME), "required")
    assert schema["$defs"] == {"Address": address}
    jsonschema.validate([{"name": "ship", "parameters": {"to": {"street": "Main"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "ship", "parameters": {"to": {"city": "Oslo"}}}], schema)
    other = json.loads(json.dumps(ship))
    other["function"]["name"] = "ship_fast"
    other["function"]["parameters"]["$defs"]["Address"] = {"type": "string"}
    with pytest.raises(OpenAIError) as error:
        tool_choice_json_schema(_tools(ship, other), "required")
    assert error.value.param == "tools"


def test_named_schema_is_the_functions_arguments():
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
    schema = tool_choice_json_schema(_tools(WEATHER, TIME), named)
    jsonschema.validate({"city": "Paris"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({}, schema)
    no_parameters = {"type": "function", "function": {"name": "ping"}}
    ping = NamedToolChoice.model_validate({"type": "function", "function": {"name": "ping"}})
    assert tool_choice_json_schema(_tools(no_parameters), ping) == {"type": "object", "properties": {}}
    assert tool_choice_json_schema(_tools(WEATHER), "auto") is None
    assert tool_choice_json_schema(_tools(WEATHER), "none") is None


# Server flags --------------------------------------------------------------------------------


def _flags(**given) -> argparse.Namespace:
    return argparse.Namespace(**{
        "enable_auto_tool_choice": False, "tool_call_parser": None, "tool_parser_plugin": None, **given
    })


def test_tool_flags(tmp_path):
    assert auto_tool_parser(_flags()) is None
    assert auto_tool_parser(_flags(tool_call_parser="hermes")) is None  # "auto" stays off
    assert auto_tool_parser(_flags(enable_auto_tool_choice=True, tool_call_parser="hermes")).name == "hermes"
    with pytest.raises(ValueError, match="requires --tool-call-parser"):
        auto_tool_parser(_flags(enable_auto_tool_choice=True))
    with pytest.raises(ValueError, match="choose from"):
        auto_tool_parser(_flags(enable_auto_tool_choice=True, tool_call_parser="nope"))
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "from pagoda.entrypoints.openai.tool_parsers import PartialCall, Scan, ToolParser, register_tool_parser\n"
        "@register_tool_parser\n"
        "class WholeReply(ToolParser):\n"
        "    name = 'whole_reply'  # the reply is the name of a function to call without arguments\n"
        "    def scan(self, text, final):\n"
        "        return Scan(content='', calls=[PartialCall(name=text, arguments='{}', complete=final)])\n"
    )
    parser = auto_tool_parser(_flags(enable_auto_tool_choice=True, tool_call_parser="whole_reply",
                                     tool_parser_plugin=str(plugin)))
    assert [c.function.name for c in parser(None).extract("get_time").tool_calls] == ["get_time"]


# End to end ----------------------------------------------------------------------------------

# The prompt ends with the last message's text (a trigger token of the scripted model); tools and
# the history's calls are written before it, so that /tokenize shows what the template received.
TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{% endfor %}{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{{ m.content }}{% endfor %}"
)
REPLIES = {
    "ask-hermes": ["Let me check.", "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": ',
                   '"Paris"}}\n', "</tool_call>"],
    "ask-llama": ["<|python_tag|>", '{"name": "get_weather", "parameters": ', '{"city": ', '"Paris"}}'],
    "ask-mistral": ["[TOOL_CALLS]", '[{"name": "get_weather", "arguments": ', '{"city": "Pa', 'ris"}}]'],
    "ask-plain": ["Hello ", "there."],
    "ask-named": ['{"city":', ' "Rome"}'],
    "ask-required": ['[{"name": "get_weather", "parameters": ', '{"city": "Oslo"}}]'],
    "tool-result": ["It is sunny ", "in Paris."],
}
TRIGGER = {"hermes": "ask-hermes", "llama3_json": "ask-llama", "mistral": "ask-mistral"}
SPECIAL = ["<tool_call>", "<|python_tag|>", "[TOOL_CALLS]"]  # dropped unless the parser keeps specials


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_scripted_model(tmp_path_factory.mktemp("scripted"), REPLIES, TEMPLATE, SPECIAL)


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    """name -> a started server with --enable-auto-tool-choice --tool-call-parser name (each
    started once, when a test first needs it)."""
    with contextlib.ExitStack() as stack:
        logs = tmp_path_factory.mktemp("logs")

        def start(name: str) -> openai.OpenAI:
            args = [str(model), "--served-model-name", "scripted", "--enable-auto-tool-choice",
                    "--tool-call-parser", name]
            _, base = stack.enter_context(serving(args, logs / f"{name}.log"))
            return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)

        yield _Started(start)


class _Started(dict):
    def __init__(self, start) -> None:
        super().__init__()
        self.start = start

    def __missing__(self, name: str) -> openai.OpenAI:
        self[name] = self.start(name)
        return self[name]


@pytest.fixture(params=list(TRIGGER))
def parser_server(request, servers):
    return request.param, servers[request.param]


@pytest.fixture
def hermes(servers):
    return servers["hermes"]


def _ask(client: openai.OpenAI, text: str, **kwargs):
    return client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": text}], temperature=0, **kwargs
    )


def _streamed(client: openai.OpenAI, text: str, **kwargs) -> tuple[str, list[dict], list]:
    """The content and the calls assembled from a stream, and its finish reasons."""
    content, calls, finish = "", [], []
    for chunk in _ask(client, text, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index == len(calls):
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls.append({"id": delta.id, "name": delta.function.name, "arguments": "", "pieces": 0})
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
                calls[delta.index]["pieces"] += bool(delta.function.arguments)
            finish.append(choice.finish_reason)
    return content, calls, [f for f in finish if f is not None]


def test_auto_tool_call_whole(parser_server):
    name, client = parser_server
    choice = _ask(client, TRIGGER[name], tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ("Let me check." if name == "hermes" else None)
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert len(call.id) == 9 if name == "mistral" else call.id.startswith("chatcmpl-tool-")


def test_auto_tool_call_streamed(parser_server):
    name, client = parser_server
    content, calls, finish = _streamed(client, TRIGGER[name], tools=TOOLS)
    assert content == ("Let me check." if name == "hermes" else "")
    # In how many pieces the arguments come depends on the reader's pace (a stream behind the
    # engine gets what queued as one chunk); test_parser_streams_text_character_by_character
    # checks that they stream as the text grows.
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert finish == ["tool_calls"]


def test_auto_reply_without_calls_is_content(parser_server):
    _, client = parser_server
    choice = _ask(client, "ask-plain", tools=TOOLS).choices[0]
    # The stop token stays out of the text although the parser keeps special tokens.
    assert choice.message.content == "Hello there." and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert _streamed(client, "ask-plain", tools=TOOLS) == ("Hello there.", [], ["stop"])


def test_tool_choice_none_leaves_the_reply_as_content(parser_server):
    name, client = parser_server
    choice = _ask(client, TRIGGER[name], tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert "get_weather" in choice.message.content


def test_history_with_tool_calls_and_results(hermes):
    base = str(hermes.base_url).removesuffix("/v1/")
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "tool-result"},
    ]
    reply = hermes.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, tool_choice="none")
    assert reply.choices[0].message.content == "It is sunny in Paris."
    tokens = httpx.post(f"{base}/tokenize", json={"model": "scripted", "messages": messages, "tools": TOOLS}).json()
    prompt = httpx.post(f"{base}/detokenize", json={"model": "scripted", "tokens": tokens["tokens"]}).json()["prompt"]
    # The template got the tools, and the call's arguments as an object (as vLLM passes them).
    assert f"<tools>{json.dumps(TOOLS)}</tools>" in prompt
    assert '<call>get_weather {"city": "Paris"}</call>' in prompt and "[call_1]tool-result" in prompt


def test_named_tool_choice(hermes):
    client = hermes
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = _ask(client, "ask-named", tools=TOOLS, tool_choice=named).choices[0]
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    assert choice.finish_reason == "stop" and call.id.startswith("chatcmpl-tool-")
    content, calls, finish = _streamed(client, "ask-named", tools=TOOLS, tool_choice=named)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert content == "" and finish == ["stop"]


def test_required_tool_choice(hermes):
    client = hermes
    choice = _ask(client, "ask-required", tools=TOOLS, tool_choice="required").choices[0]
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert choice.finish_reason == "tool_calls"
    _, calls, finish = _streamed(client, "ask-required", tools=TOOLS, tool_choice="required")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert finish == ["tool_calls"]


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": {"get_weather": {}}}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{city"}}]},
                   {"role": "user", "content": "ask-plain"}]}, "messages.0.tool_calls"),
])
def test_bad_tool_requests_get_400(hermes, body, param):
    base, client = str(hermes.base_url).removesuffix("/v1/"), hermes
    request = {"model": "scripted", "messages": [{"role": "user", "content": "ask-plain"}], **body}
    openai_error(httpx.post(f"{base}/v1/chat/completions", json=request, timeout=30), 400, param)
    assert _ask(client, "ask-plain").choices[0].message.content == "Hello there."  # the server goes on


@pytest.mark.parametrize("tool_choice", [None, "auto"])  # "auto" is the default with tools
def test_auto_needs_enable_auto_tool_choice(tool_choice):
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice=tool_choice)
    with pytest.raises(OpenAIError, match="--enable-auto-tool-choice") as error:
        tool_calling(request, auto_parser=None, tokenizer=None)
    assert (error.value.status, error.value.param) == (400, "tool_choice")
    assert tool_calling(request, get_tool_parser("hermes"), None).finish_reason == "tool_calls"
