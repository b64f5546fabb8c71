"""`pagoda run-batch`: an OpenAI batch file of chat and completion lines, bad lines among them, run
offline; each line gets its result or its error, in the input's order. Embedding, score and
rerank lines on an engine with --runner pooling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import save_tokenizer
from tests.tiny_models import save_tiny_model


def line(custom_id: str, url: str, body: dict, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _tiny_model(directory: Path) -> str:
    vocab_size = save_tokenizer(directory / "llama3")
    return str(save_tiny_model("llama3", directory, vocab_size=vocab_size, max_position_embeddings=256))


def _run_batch(tmp_path: Path, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "pagoda.entrypoints.cli", "run-batch", "-i", str(requests), "-o", str(results),
         "--device", "cpu", "--max-model-len", "256", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_run_batch_answers_each_line_in_order(tmp_path: Path):
    model = _tiny_model(tmp_path)
    greedy = {"temperature": 0, "ignore_eos": True}
    lines = [
        line("chat", "/v1/chat/completions",
             {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **greedy}),
        "{this is not json",
        line("completion", "/v1/completions", {"prompt": "hello", "max_tokens": 4, "n": 2, **greedy}),
        line("bad-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}),
        line("bad-url", "/v1/images/generations", {"prompt": "x"}),
        line("wrong-model", "/v1/completions", {"model": "other", "prompt": "x"}),
        line("streamed", "/v1/completions", {"prompt": "x", "stream": True}),
        line("same-prompt", "/v1/completions", {"prompt": "hello", "max_tokens": 4, **greedy}),
    ]
    done = _run_batch(tmp_path, lines, "--model", model)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Running batch" in done.stderr and "8/8" in done.stderr  # the progress bar
    out = [json.loads(text) for text in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [
        "chat", None, "completion", "bad-max-tokens", "bad-url", "wrong-model", "streamed", "same-prompt",
    ]
    assert all(set(o) == {"id", "custom_id", "response", "error"} for o in out)
    assert len({o["id"] for o in out}) == len(out)
    assert all(set(o["response"]) == {"status_code", "request_id", "body"} for o in out)

    chat, bad_json, completion, bad_max, bad_url, wrong_model, streamed, same = out
    for ok in (chat, completion, same):
        assert ok["error"] is None and ok["response"]["status_code"] == 200
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert chat["response"]["body"]["usage"]["completion_tokens"] == 5
    assert chat["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    body = completion["response"]["body"]
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    # Greedy, so the same prompt gives the same text, whichever line asks.
    assert same["response"]["body"]["choices"][0]["text"] == body["choices"][0]["text"]

    def refused(result: dict, status: int, param: str | None) -> None:
        assert result["response"]["status_code"] == status and result["response"]["body"] is None
        error = result["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, error

    refused(bad_json, 400, None)
    assert "JSON" in bad_json["error"]["message"]
    refused(bad_max, 400, "max_tokens")
    refused(bad_url, 400, "url")
    refused(wrong_model, 404, "model")
    refused(streamed, 400, "stream")


def test_run_batch_embeds_on_a_pooling_engine(tmp_path: Path):
    model = _tiny_model(tmp_path)
    lines = [
        line("one", "/v1/embeddings", {"input": "hello"}),
        line("two", "/v1/embeddings", {"input": ["hi", "a longer text"]}),
        line("no-input", "/v1/embeddings", {}),
        line("not-matryoshka", "/v1/embeddings", {"input": "x", "dimensions": 3}),
    ]
    done = _run_batch(tmp_path, lines, "--model", model, "--runner", "pooling")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two, missing, shortened = [json.loads(text) for text in (tmp_path / "results.jsonl").read_text().splitlines()]
    vector = one["response"]["body"]["data"][0]["embedding"]
    assert one["error"] is None and len(vector) == 64 and abs(sum(v * v for v in vector) - 1) < 1e-4  # normalized
    assert [len(d["embedding"]) for d in two["response"]["body"]["data"]] == [64, 64]
    assert missing["response"]["status_code"] == 400 and missing["error"]["param"] == "input"
    assert shortened["response"]["status_code"] == 400 and shortened["error"]["param"] == "dimensions"


def test_run_batch_scores_and_reranks_with_a_cross_encoder(tmp_path: Path):
    from tests.test_score import hf_score, save_cross_encoder

    model = str(save_cross_encoder("bert", tmp_path))
    documents = ["a pagoda is a tower", "the sea is wide"]
    lines = [
        line("score", "/v1/score", {"text_1": "what is a pagoda", "text_2": documents}),
        line("rerank", "/v1/rerank", {"query": "what is a pagoda", "documents": documents, "top_n": 1}),
        line("bad-pairs", "/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}),
    ]
    done = _run_batch(tmp_path, lines, "--model", model, "--runner", "pooling", "--max-model-len", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    score, rerank, bad = [json.loads(text) for text in (tmp_path / "results.jsonl").read_text().splitlines()]
    expected = [hf_score(Path(model), "what is a pagoda", d) for d in documents]
    assert [d["score"] for d in score["response"]["body"]["data"]] == pytest.approx(expected, abs=1e-4)
    (best,) = rerank["response"]["body"]["results"]
    assert best["index"] == max(range(2), key=expected.__getitem__)
    assert best["relevance_score"] == pytest.approx(max(expected), abs=1e-4)
    assert bad["response"]["status_code"] == 400 and bad["error"]["param"] == "text_2"
