"""Reasoning models and chat options: --reasoning-parser splitting <think>...</think> from the answer
(unit tests of the splitter on whole texts and on every way of streaming them, then end to end
through `pagoda serve` on a tiny random llama whose tokenizer has <think> tokens and a Qwen3-style
template), include_reasoning, chat_template_kwargs, echo, add_generation_prompt,
continue_final_message, custom roles and stream_options."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from pagoda.entrypoints.openai.reasoning import ReasoningSplitter, reasoning_splitter
from tests.serving import MAX_MODEL_LEN, MODEL, openai_error, save_tokenizer, served
from tests.tiny_models import save_tiny_model

# ChatML, with Qwen3's switch: enable_thinking false closes an empty thinking block in the prompt.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
USER = [{"role": "user", "content": "Why?"}]


# The splitter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, reasoning, content", [
    ("abc</think>def", "abc", "def"),
    ("<think>abc</think>def", "abc", "def"),
    ("\n<think>abc</think>", "\nabc", ""),
    ("abc", "abc", ""),  # cut off while thinking: all of it is thinking
    ("</think>", "", ""),
    ("a < b </thin</think> x </think> <think>y", "a < b </thin", " x </think> <think>y"),
])
def test_split_whole(text, reasoning, content):
    assert ReasoningSplitter().split(text) == (reasoning, content)


@pytest.mark.parametrize("text", [
    "abc</think>def", "<think>abc</think>def", "a<b</t</think>>x<", "<thi<think>nk</think></think>", "</", "<think",
])
def test_streamed_pieces_add_up_to_the_whole_split(text):
    whole = ReasoningSplitter().split(text)
    cuts = [[text[:i], text[i:j], text[j:]] for i in range(len(text) + 1) for j in range(i, len(text) + 1)]
    for pieces in [*cuts, list(text)]:
        splitter = ReasoningSplitter()
        fed = [splitter.feed(piece) for piece in pieces] + [splitter.finish()]
        assert ("".join(r for r, _ in fed), "".join(c for _, c in fed)) == whole, pieces
        # No piece of a tag ever goes out.
        assert not any("<think>" in r or "</think>" in r for r, _ in fed)


def test_qwen3_without_thinking_is_all_content():
    assert reasoning_splitter("qwen3", {"enable_thinking": False}).split("a</think>b") == ("", "a</think>b")
    assert reasoning_splitter("qwen3", None).split("a</think>b") == ("a", "b")
    assert reasoning_splitter("deepseek_r1", {"enable_thinking": False}).split("a</think>b") == ("a", "b")
    assert reasoning_splitter(None, None) is None


# Through the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    directory = tmp_path_factory.mktemp("thinking-tokenizer")
    save_tokenizer(directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    # Added, not special (as Qwen3's and DeepSeek-R1's are): they stay in the decoded text.
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("thinking-model")
    path = save_tiny_model("llama3", directory, vocab_size=len(tokenizer), max_position_embeddings=MAX_MODEL_LEN)
    tokenizer.save_pretrained(path)
    args = [str(path), "--served-model-name", MODEL, "--max-num-seqs", "8", "--seed", "0", "--reasoning-parser", "qwen3"]
    with served(args, directory / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def thinking(tokenizer) -> dict:
    """Sampling that makes the random model write a mix of 'a', 'b' and </think> (and nothing else):
    a large logit_bias on just those tokens, a little less on </think>, which it favours."""
    bias = {"a": 100, "b": 100, "</think>": 97}
    return dict(max_tokens=24, temperature=1.0, seed=SEED,
                logit_bias={str(tokenizer.convert_tokens_to_ids(token)): value for token, value in bias.items()})


SEED = 1


def _raw(completion) -> str:
    """The model's whole output, from the per-token logprobs (which the parser does not split)."""
    return "".join(token.token for token in completion.choices[0].logprobs.content)


def test_reasoning_content_whole_and_streamed(client, thinking):
    whole = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, **thinking)
    raw = _raw(whole)
    reasoning, content = raw.split("</think>", 1)
    assert reasoning and content, raw  # the seed makes the model stop thinking midway
    message = whole.choices[0].message
    assert message.reasoning_content == reasoning and message.reasoning == reasoning
    assert message.content == content
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True, **thinking))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    streamed_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert streamed_reasoning == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_include_reasoning_false_leaves_it_out(client, thinking):
    whole = client.chat.completions.create(
        model=MODEL, messages=USER, logprobs=True, extra_body={"include_reasoning": False}, **thinking
    )
    message = whole.choices[0].message
    assert message.content == _raw(whole).split("</think>", 1)[1]
    assert getattr(message, "reasoning_content", None) is None
    chunks = client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, extra_body={"include_reasoning": False}, **thinking
    )
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert not any(getattr(d, "reasoning_content", None) for d in deltas)
    assert "".join(d.content or "" for d in deltas) == message.content


def test_chat_template_kwargs_reach_the_template(client, tokenizer, thinking):
    off = client.chat.completions.create(
        model=MODEL, messages=USER, logprobs=True, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        **thinking,
    )
    on = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, **thinking)
    closed_block = len(tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + closed_block
    # Qwen3 with thinking off: the whole output is the answer.
    assert off.choices[0].message.content == _raw(off)
    assert getattr(off.choices[0].message, "reasoning_content", None) is None


def test_responses_api_has_a_reasoning_item(client, thinking):
    chat = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, **thinking)
    reasoning, content = _raw(chat).split("</think>", 1)
    extra = {"seed": SEED, "logit_bias": thinking["logit_bias"]}
    response = client.responses.create(model=MODEL, input="Why?", max_output_tokens=24, temperature=1.0,
                                       extra_body=extra)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == reasoning and response.output_text == content
    events = list(client.responses.create(model=MODEL, input="Why?", max_output_tokens=24, temperature=1.0,
                                          stream=True, store=False, extra_body=extra))
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == reasoning
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == content
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == ["reasoning", "message"]


# Chat options ------------------------------------------------------------------------------------


def test_echo_starts_the_reply_with_the_last_message(client):
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}]
    greedy = dict(model=MODEL, messages=turn, max_tokens=5, temperature=0.0)
    plain = client.chat.completions.create(**greedy, extra_body={"add_generation_prompt": False})
    echoed = client.chat.completions.create(**greedy, extra_body={"add_generation_prompt": False, "echo": True})
    assert echoed.choices[0].message.role == "assistant"
    assert echoed.choices[0].message.content == "Sure," + (plain.choices[0].message.content or "")
    chunks = list(client.chat.completions.create(
        **greedy, stream=True, extra_body={"add_generation_prompt": False, "echo": True}
    ))
    assert chunks[1].choices[0].delta.content == "Sure,"
    # With the generation prompt the reply is the assistant's, the last message the user's: nothing to echo.
    asked = dict(model=MODEL, messages=USER, max_tokens=5, temperature=0.0)
    assert client.chat.completions.create(**asked, extra_body={"echo": True}).choices[0].message.content == (
        client.chat.completions.create(**asked).choices[0].message.content
    )


def test_generation_prompt_and_continue_final_message(client, http, tokenizer):
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure"}]

    def prompt_tokens(**extra) -> int:
        body = {"model": MODEL, "messages": turn, "max_tokens": 1, **extra}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    closed = prompt_tokens(add_generation_prompt=False)
    opened = len(tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False))
    assert prompt_tokens() == closed + opened
    # The last message left open: no <|im_end|>\n after it.
    assert prompt_tokens(continue_final_message=True) == closed - 2
    body = {"model": MODEL, "messages": turn, "continue_final_message": True, "add_generation_prompt": True}
    openai_error(http.post("/v1/chat/completions", json=body), 400, "continue_final_message")


def test_custom_roles_go_to_the_template(http):
    def prompt_tokens(role: str) -> int:
        body = {"model": MODEL, "messages": [{"role": role, "content": "x"}], "max_tokens": 1}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    # One token per byte: the role's name is in the prompt as it was sent.
    assert prompt_tokens("wizard") == prompt_tokens("user") + len("wizard") - len("user")
    assert prompt_tokens("developer") == prompt_tokens("system")


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": USER, "stream": False, "stream_options": {}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": USER, "include_reasoning": "maybe"}, "include_reasoning"),
    ("/v1/chat/completions", {"messages": USER, "echo": [True]}, "echo"),
    ("/v1/chat/completions", {"messages": USER, "continue_final_message": {}}, "continue_final_message"),
    ("/v1/chat/completions", {"messages": USER, "add_generation_prompt": "sometimes"}, "add_generation_prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]}, "messages.0.role"),
])
def test_bad_requests_name_the_field(http, route, body, param):
    openai_error(http.post(route, json={"model": MODEL, "max_tokens": 1, **body}), 400, param)


def test_after_bad_requests_the_server_goes_on(client):
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices[0].message is not None
