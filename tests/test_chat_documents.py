"""vLLM's `documents` on chat requests: what a retrieval-augmented chat template grounds its
reply in reaches the template (it was dropped, and chat_template_kwargs may not carry it)."""

from __future__ import annotations

import httpx
import pytest

from tests.serving import MODEL, http_client, serving, tiny_model_args

TEMPLATE = (
    "{% for d in documents or [] %}<doc title={{ d['title'] }}>{{ d['text'] }}</doc>\n{% endfor %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    directory = tmp_path_factory.mktemp("documents")
    args = [*tiny_model_args(directory), "--chat-template", TEMPLATE]
    with serving(args, directory / "server.log") as (_, base):
        with http_client(base) as client:
            yield client


def prompt_text(http: httpx.Client, **body) -> str:
    response = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "where?"}], "max_tokens": 1,
        "return_token_ids": True, **body,
    })
    assert response.status_code == 200, response.text
    ids = response.json()["prompt_token_ids"]
    return http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]


def test_documents_reach_the_chat_template(http):
    documents = [{"title": "atlas", "text": "Paris is in France."}, {"title": "memo", "text": "Lyon too."}]
    assert prompt_text(http, documents=documents) == (
        "<doc title=atlas>Paris is in France.</doc>\n<doc title=memo>Lyon too.</doc>\nuser: where?\nassistant:"
    )
    assert prompt_text(http) == "user: where?\nassistant:"
    refused = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "documents": "not a list",
    })
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents"
