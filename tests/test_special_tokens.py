"""vLLM's add_special_tokens on a model whose tokenizer adds BOS: a completion's text prompt gets
it unless the request says false; a chat's rendered template does not (the template holds its own
special tokens) unless the request says true; /tokenize follows each route's default."""

from __future__ import annotations

import pytest

from tests.serving import MODEL, http_client, save_tokenizer, serving
from tests.tiny_models import save_tiny_model

BOS = 0
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    directory = tmp_path_factory.mktemp("special-tokens")
    vocab_size = save_tokenizer(directory / "llama3", adds_bos=True)
    path = save_tiny_model("llama3", directory, vocab_size=vocab_size)
    with serving([str(path), "--served-model-name", MODEL], directory / "server.log") as (_, base):
        with http_client(base) as client:
            yield client


def prompt_ids(http, route: str, **body) -> list[int]:
    body = {"model": MODEL, "max_tokens": 1, "return_token_ids": True, **body}
    response = http.post(f"/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["choices"][0]["prompt_token_ids"] if route == "completions" else data["prompt_token_ids"]


def test_a_completion_prompt_gets_bos_unless_the_request_says_not(http):
    with_bos = prompt_ids(http, "completions", prompt="abc")
    assert with_bos[0] == BOS
    assert prompt_ids(http, "completions", prompt="abc", add_special_tokens=False) == with_bos[1:]


def test_a_chat_prompt_gets_bos_only_when_the_request_asks(http):
    plain = prompt_ids(http, "chat/completions", messages=MESSAGES)
    assert plain[0] != BOS
    assert prompt_ids(http, "chat/completions", messages=MESSAGES, add_special_tokens=True) == [BOS] + plain
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["tokens"]
    assert tokenized == plain
    asked = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES, "add_special_tokens": True}).json()
    assert asked["tokens"] == [BOS] + plain
    assert http.post("/tokenize", json={"model": MODEL, "prompt": "abc"}).json()["tokens"][0] == BOS
