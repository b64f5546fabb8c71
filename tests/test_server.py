"""`pagoda serve` end to end: a real server in a subprocess on a tiny random llama with a byte-level
tokenizer, driven by the official openai client and raw httpx."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import socket
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerFast

from pagoda.benchmarks.serve import RequestResult, _summary
from pagoda.config import EngineConfig
from pagoda.config.resolve import default_sampling
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine import messages
from pagoda.engine.input_processor import fan_out
from pagoda.engine.messages import CoreOutput, Outputs
from pagoda.engine.output_processor import IterationStats, OutputProcessor
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, ServerConfig
from pagoda.loader.model_loader import load_generation_defaults
from pagoda.sample.top_logprobs import TopLogprobs
from pagoda.sampling_params import SamplingParams
from tests.serving import (
    API_KEY, MAX_MODEL_LEN, MODEL, SPECIALS, descendants, save_tokenizer, serving, still_alive,
    openai_error, tiny_model_args,
)
from tests.tiny_models import save_tiny_model

@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    """A tiny random llama with the byte-level tokenizer, as `pagoda serve` arguments."""
    return tiny_model_args(tmp_path_factory.mktemp("server-model"))


@pytest.fixture(scope="module")
def server(model_args, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"PAGODA_API_KEY": API_KEY, "PAGODA_LOG_STATS_INTERVAL": "1"}
    with serving(model_args, log, env) as (proc, base):
        yield proc, base, log


@pytest.fixture(scope="module")
def base(server) -> str:
    return server[1]


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, timeout=60.0, max_retries=0)


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60.0) as c:
        yield c


def _metrics(http: httpx.Client) -> dict[str, float]:
    """Every pagoda: sample, keyed by its name and its labels other than model_name."""
    values = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            assert sample.labels.pop("model_name") == MODEL
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _finished(m: dict[str, float], reason: str) -> float:
    return m[f"pagoda:request_success_total{{finished_reason={reason}}}"]


def _wait_idle(http: httpx.Client, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _metrics(http)
        if m["pagoda:num_requests_running"] == 0 and m["pagoda:num_requests_waiting"] == 0 \
                and m["pagoda:kv_cache_usage_perc"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {_metrics(http)}")


GREEDY = dict(temperature=0.0, max_tokens=12)


# The engine core's messages ----------------------------------------------------------------------


def test_core_outputs_cross_the_process_boundary_intact():
    top = TopLogprobs([7, 3], [-0.5, -0.25], [2, 1])
    outputs = [
        CoreOutput("r", [7], [top], (1, [top, top]), None, None, 16, 123.5),
        CoreOutput("0_s", [], None, None, "stop", 2, 0, None),
    ]
    step = Outputs(outputs, SchedulerStats(1, 2, 0.5, 3, 4, 5), 17, timestamp=1700000000.125)
    assert messages.decode_from_core(messages.encode(step)) == step


def test_front_end_detokenizes_and_ends_a_request_on_a_stop_string(tmp_path):
    """What the server process does with the core's token ids: text, and a stop string that ends
    one child of an n=2 request here (the core is told to stop it) while the other goes on."""
    save_tokenizer(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    processor = OutputProcessor(tokenizer)
    children = fan_out("r", SamplingParams(n=2, stop=["lo"], max_tokens=10))
    processor.add("r", "say", tokenizer.encode("say"), children)
    (a, _), (b, _) = children

    def step(char_a: str, char_b: str, finish_b: str | None = None):
        outputs, stopped = processor.process(Outputs([
            CoreOutput(a, tokenizer.encode(char_a)), CoreOutput(b, tokenizer.encode(char_b), finish_reason=finish_b),
        ], None))
        return outputs[0], stopped

    out, stopped = step("h", "y")
    assert [c.text for c in out.outputs] == ["h", "y"] and not stopped
    out, stopped = step("l", "l")  # "l" could begin "lo": held back from the deltas
    assert [c.text_delta for c in out.outputs] == ["", ""]
    out, stopped = step("o", "a")
    assert stopped == [a] and not out.finished
    assert (out.outputs[0].text, out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("h", "stop", "lo")
    assert out.outputs[1].text_delta == "la"
    # The core goes on with the stopped child until it hears of it: that output is dropped.
    out, stopped = step("x", "!", finish_b="length")
    assert out.finished and [c.text for c in out.outputs] == ["h", "yla!"] and not stopped
    assert [c.finish_reason for c in out.outputs] == ["stop", "length"] and not processor.parents


def test_steps_applied_together_give_one_output_each_and_stop_where_they_did(tmp_path):
    """A front end behind the core applies the steps it holds in order and makes one output per
    request: the text of all of them, and a stop string ending a request at its own step (the
    tokens after it, generated before the core heard, are dropped)."""
    save_tokenizer(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    processor = OutputProcessor(tokenizer)
    (a, _), = a_children = fan_out("a", SamplingParams(stop=["lo"], max_tokens=10))
    (b, _), = b_children = fan_out("b", SamplingParams(max_tokens=10))
    processor.add("a", "x", tokenizer.encode("x"), a_children)
    processor.add("b", "x", tokenizer.encode("x"), b_children)
    steps = [[CoreOutput(a, tokenizer.encode(ca)), CoreOutput(b, tokenizer.encode(cb))] for ca, cb in ["hh", "le", "oy", "!!"]]
    outputs, stopped = processor.process_steps([(Outputs(step, None), IterationStats(2)) for step in steps])
    by_id = {o.request_id: o.outputs[0] for o in outputs}
    assert len(outputs) == 2 and stopped == [a]
    assert (by_id["a"].text, by_id["a"].finish_reason, len(by_id["a"].token_ids)) == ("h", "stop", 3)
    assert by_id["b"].text == by_id["b"].text_delta == "hey!" and by_id["b"].finish_reason is None


def test_each_output_keeps_the_metrics_it_was_made_with(tmp_path):
    """A consumer may read an output after later steps: its metrics stay as they were then (the
    first token's time once it came, no finish time until the last)."""
    save_tokenizer(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    processor = OutputProcessor(tokenizer)
    (child, _), = children = fan_out("r", SamplingParams(max_tokens=3))
    processor.add("r", "hi", tokenizer.encode("hi"), children)
    scheduled = CoreOutput(child, [], first_scheduled_time=5.0)  # a prompt chunk: no token yet
    first, second, last = (processor.process(Outputs([out], None))[0][0] for out in [
        scheduled, CoreOutput(child, tokenizer.encode("a")), CoreOutput(child, tokenizer.encode("b"), finish_reason="length"),
    ])
    assert first.metrics.first_scheduled_time == 5.0 and first.metrics.first_token_time is None
    assert second.metrics.first_token_time is not None and second.metrics.finished_time is None
    assert last.metrics.finished_time is not None and last.metrics.first_token_time == second.metrics.first_token_time
    assert first.metrics.first_token_time is None and second.metrics.finished_time is None  # unchanged since


def test_request_timings_are_the_cores_though_the_front_end_takes_its_steps_at_once():
    """A front end behind the core applies several steps at one moment of its own: the first
    token's time, the inter-token latencies and the finish are those the core stamped on the steps
    that made them."""
    processor = OutputProcessor(None)
    (child, _), = children = fan_out("r", SamplingParams(max_tokens=3))
    processor.add("r", None, [1, 2], children, arrival_time=100.0)
    steps = [
        (Outputs([CoreOutput(child, [token], finish_reason=finish)], None, 1, made), IterationStats(1))
        for token, finish, made in [(5, None, 101.0), (6, None, 101.25), (7, "length", 101.75)]
    ]
    (output,), _ = processor.process_steps(steps)
    assert (output.metrics.first_token_time, output.metrics.finished_time) == (101.0, 101.75)
    assert [stats.inter_token_latencies for _, stats in steps] == [[], [0.25], [0.5]]


# Plain endpoints ---------------------------------------------------------------------------------


def test_models_health_version(client, base, http):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/version").json()["version"]


def test_tokenize_detokenize(http):
    tokens = http.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()
    assert tokens["count"] == len("héllo".encode()) and tokens["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "héllo"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"][0] == SPECIALS.index("<|im_start|>")


# Completions -------------------------------------------------------------------------------------


def test_completion_stream_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)
    chunks = list(client.completions.create(
        model=MODEL, prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage == whole.usage


def test_completion_usage_is_exact(client, http):
    prompt = "count these bytes"
    prompt_tokens = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == prompt_tokens + 7
    assert out.choices[0].finish_reason == "length"


def test_completion_prompt_forms(client, http):
    ids = http.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="abc", **GREEDY).choices[0].text
    assert client.completions.create(model=MODEL, prompt=ids, **GREEDY).choices[0].text == by_text
    many = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], **GREEDY)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == by_text
    texts = client.completions.create(model=MODEL, prompt=["abc", "ab"], **GREEDY)
    assert [c.text for c in texts.choices] == [c.text for c in many.choices]


def test_completion_n_logprobs_echo(client):
    out = client.completions.create(
        model=MODEL, prompt="ab", n=2, logprobs=2, temperature=1.0, seed=1, max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(value <= 0 for value in lp.token_logprobs)
        # Byte tokens that are not whole characters share the text "\ufffd": keys can merge.
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert out.usage.completion_tokens == 10
    echo = client.completions.create(model=MODEL, prompt="ab", echo=True, logprobs=1, **GREEDY).choices[0]
    assert echo.text.startswith("ab")
    tokens = echo.logprobs.tokens
    assert tokens[:2] == ["a", "b"] and echo.logprobs.token_logprobs[0] is None  # the first token has none
    assert len(tokens) == 2 + GREEDY["max_tokens"] or echo.finish_reason == "stop"
    assert echo.logprobs.text_offset[:3] == [0, 1, 2]


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, http):
    """vLLM's echo without generation (how evaluation harnesses score a text): the prompt and its
    logprobs, nothing generated; without echo max_tokens=0 is still refused."""
    prompt = "abcab"
    scored = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    generated = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, **GREEDY).choices[0]
    assert choice.logprobs.tokens == generated.logprobs.tokens[: len(prompt)]
    assert choice.logprobs.token_logprobs == generated.logprobs.token_logprobs[: len(prompt)]
    streamed = list(client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0, stream=True,
    ))
    assert "".join(c.text for chunk in streamed for c in chunk.choices) == prompt
    assert [t for chunk in streamed for c in chunk.choices for t in c.logprobs.tokens] == choice.logprobs.tokens
    refused = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_prompt_logprobs(http):
    ids = http.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    body = {"prompt": "abc", "max_tokens": 2, "prompt_logprobs": 2, "n": 2, "temperature": 0}
    choices = http.post("/v1/completions", json=body).json()["choices"]
    for choice in choices:
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(ids) and positions[0] is None
        chosen = [position[str(token_id)] for token_id, position in zip(ids[1:], positions[1:])]
        assert [c["decoded_token"] for c in chosen] == ["b", "c"] and all(c["logprob"] <= 0 for c in chosen)
        assert all(1 <= len(position) <= 3 for position in positions[1:])
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and all(len(p) == 1 for p in chat["prompt_logprobs"][1:])
    # Present as null when not asked for, as vLLM returns it.
    unasked = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2}).json()["choices"][0]
    assert "prompt_logprobs" in unasked and unasked["prompt_logprobs"] is None
    openai_error(http.post("/v1/completions", json={**body, "stream": True}), 400, "prompt_logprobs")


def test_completion_stop_string(client):
    text = client.completions.create(model=MODEL, prompt="stop here", **GREEDY).choices[0].text
    stop = text[3:5]
    if not stop or text.find(stop) < 3:
        pytest.skip("greedy text has no usable stop string")
    kept = text[: text.find(stop)]
    out = client.completions.create(model=MODEL, prompt="stop here", stop=[stop], **GREEDY).choices[0]
    assert out.text == kept and out.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="stop here", stop=[stop], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == kept


def test_seed_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(
            model=MODEL, prompt="seeded", temperature=1.0, seed=seed, max_tokens=10, extra_body={"ignore_eos": True}
        ).choices[0].text

    assert sample(5) == sample(5)


# Metrics, logs, load --------------------------------------------------------------------------


VOCAB_SIZE = len(SPECIALS) + 256


def test_request_metrics_move_with_requests(client, http):
    before = _wait_idle(http)
    prompt_tokens = 0
    for i in range(3):
        out = client.completions.create(
            model=MODEL, prompt=f"metrics {i}", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        prompt_tokens += out.usage.prompt_tokens
    # Every token is a stop token: one token, finished by "stop".
    stopped = client.completions.create(
        model=MODEL, prompt="m", max_tokens=5, extra_body={"stop_token_ids": list(range(VOCAB_SIZE))}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    after = _wait_idle(http)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("pagoda:prompt_tokens_total") == prompt_tokens + 1
    assert delta("pagoda:generation_tokens_total") == 3 * 5 + 1
    assert _finished(after, "length") - _finished(before, "length") == 3
    assert _finished(after, "stop") - _finished(before, "stop") == 1
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds"):
        assert delta(f"pagoda:{name}_count") == 4, name
    assert delta("pagoda:request_time_per_output_token_seconds_count") == 3  # the 1-token request has none
    assert delta("pagoda:e2e_request_latency_seconds_sum") > delta("pagoda:time_to_first_token_seconds_sum") > 0
    assert delta("pagoda:time_to_first_token_seconds_sum") > delta("pagoda:request_queue_time_seconds_sum") >= 0
    assert delta("pagoda:request_time_per_output_token_seconds_sum") > 0
    assert delta('pagoda:e2e_request_latency_seconds_bucket{le=+Inf}') == 4


def test_request_and_stats_log_lines(client, server):
    log = server[2]
    client.completions.create(model=MODEL, prompt="logged", max_tokens=40, temperature=0.5, seed=7,
                              extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 5  # the stats line comes every second here (every 10 s by default)
    while "Avg generation throughput" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert re.search(r"Received request cmpl-\w+-0: 6 prompt tokens, params: .*temperature=0.5.*seed=7", text)
    line = next(line for line in text.splitlines() if "Avg generation throughput" in line)
    assert re.search(r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, Prefix cache hit rate: "
                     r"[\d.]+%", line)


def test_64_concurrent_streams_equal_whole_greedy_texts(base):
    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=API_KEY, timeout=120.0, max_retries=0) as c:
            prompts = [f"client {i}: " + "abcdefgh"[: i % 8] for i in range(64)]

            async def whole(prompt: str) -> str:
                return (await c.completions.create(model=MODEL, prompt=prompt, **GREEDY)).choices[0].text

            async def streamed(prompt: str) -> tuple[str, str | None]:
                chunks = [chunk async for chunk in await c.completions.create(
                    model=MODEL, prompt=prompt, stream=True, **GREEDY)]
                return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason

            expected = await asyncio.gather(*map(whole, prompts))
            got = await asyncio.gather(*map(streamed, prompts))
            assert [text for text, _ in got] == expected
            assert all(finish in ("stop", "length") for _, finish in got)

    asyncio.run(run())


def test_data_parallel_serves_on_both_cores_with_the_same_greedy_texts(model_args, client, tmp_path):
    prompts = [f"parallel {i}" for i in range(8)]
    expected = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts]
    with serving([*model_args, "--data-parallel-size", "2"], tmp_path / "dp.log") as (_, dp_base):
        dp_client = openai.OpenAI(base_url=f"{dp_base}/v1", api_key="unused", timeout=60.0, max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(
                lambda p: dp_client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text, prompts
            ))
        assert texts == expected
        with httpx.Client(base_url=dp_base, timeout=10.0) as dp_http:
            m = _wait_idle(dp_http)
        per_core = [m[f"pagoda:engine_core_requests_total{{engine={i}}}"] for i in (0, 1)]
        assert sum(per_core) == len(prompts) and min(per_core) > 0
        assert _finished(m, "length") + _finished(m, "stop") == len(prompts)


def test_tensor_parallel_server_answers_as_one_rank_and_leaves_no_process(model_args, client, tmp_path):
    """--tensor-parallel-size 2: the engine core starts a worker process per rank; greedy texts
    equal the single-rank server's, and SIGTERM sent to every process of the tree at once (as
    `systemctl stop` sends it) takes it down in order: exit status 0, no engine death reported."""
    prompts = [f"ranks {i}" for i in range(3)]
    expected = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts]
    with serving([*model_args, "--tensor-parallel-size", "2"], tmp_path / "tp.log") as (proc, tp_base):
        tp_client = openai.OpenAI(base_url=f"{tp_base}/v1", api_key="unused", timeout=60.0, max_retries=0)
        assert [tp_client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts] \
            == expected
        tree = descendants(proc.pid)
        assert len(tree) >= 3  # the engine core and two workers (a resource tracker may join them)
        for pid in [proc.pid, *tree]:
            os.kill(pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not still_alive(tree, 10)
    assert "engine has died" not in (tmp_path / "tp.log").read_text()


def test_async_scheduling_server_answers_as_the_default_one(model_args, client, tmp_path):
    """A one-GPU server overlaps its steps (--async-scheduling, off by default on the CPU): the same
    greedy texts, seeded samples, stop strings and logprobs, streamed or whole, and a client that
    leaves mid-stream frees everything."""
    bodies = [
        dict(prompt="overlap a", **GREEDY),
        dict(prompt="overlap b", temperature=1.0, seed=3, n=2, max_tokens=10),
        dict(prompt="overlap c", temperature=0.0, max_tokens=16, stop=[" "], logprobs=2),
        dict(prompt="overlap d", temperature=0.0, max_tokens=8, frequency_penalty=0.5),
    ]

    def answers(c: openai.OpenAI) -> list:
        return [[(ch.text, ch.finish_reason, ch.logprobs and ch.logprobs.top_logprobs)
                 for ch in c.completions.create(model=MODEL, **body).choices] for body in bodies]

    def same(got: list, want: list) -> bool:
        """Equal texts and finish reasons; logprobs equal up to the rounding of other batch sizes."""
        flat_got, flat_want = [c for r in got for c in r], [c for r in want for c in r]
        return len(flat_got) == len(flat_want) and all(
            g[:2] == w[:2] and (g[2] is None) == (w[2] is None)
            and all(gt.keys() == wt.keys() and list(gt.values()) == pytest.approx(list(wt.values()), abs=1e-4)
                    for gt, wt in zip(g[2] or [], w[2] or []))
            for g, w in zip(flat_got, flat_want))

    expected = answers(client)
    with serving([*model_args, "--async-scheduling"], tmp_path / "async.log") as (_, async_base):
        async_client = openai.OpenAI(base_url=f"{async_base}/v1", api_key="unused", timeout=60.0, max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            concurrent_runs = list(pool.map(lambda _: answers(async_client), range(4)))
        assert all(same(run, expected) for run in concurrent_runs)
        streamed = async_client.completions.create(model=MODEL, stream=True, **bodies[0])
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected[0][0][0]
        with httpx.Client(base_url=async_base, timeout=30.0) as async_http:
            with async_http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
                assert next(line for line in response.iter_lines() if line.startswith("data:"))
            after = _wait_idle(async_http)
        assert after["pagoda:kv_cache_usage_perc"] == 0 and _finished(after, "abort") == 8


def test_server_without_a_tokenizer_serves_token_ids(tmp_path):
    """--skip-tokenizer-init: token-id prompts are served (tokens named "token_id:N" in logprobs,
    as vLLM names them); text prompts and chat are refused with a 400."""
    path = save_tiny_model("llama3", tmp_path, max_position_embeddings=MAX_MODEL_LEN)  # no tokenizer files
    with serving([str(path), "--skip-tokenizer-init"], tmp_path / "ids.log") as (_, ids_base):
        with httpx.Client(base_url=ids_base, timeout=60.0) as ids_http:
            body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "logprobs": 1}
            choice = ids_http.post("/v1/completions", json=body).json()["choices"][0]
            tokens = choice["logprobs"]["tokens"]
            assert len(tokens) == 4 and all(re.fullmatch(r"token_id:\d+", t) for t in tokens)
            assert all(t in top for t, top in zip(tokens, choice["logprobs"]["top_logprobs"]))
            refused = ids_http.post("/v1/completions", json={"prompt": "text", "max_tokens": 2})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"


def test_generation_config_sets_defaults_that_requests_override(tmp_path):
    """--generation-config: a generation_config.json's sampling fields become the defaults of
    requests that leave them unset; what a request sets wins; max_new_tokens stays in the context."""
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "eos_token_id": 2})
    )
    defaults = default_sampling(EngineConfig(generation_config=str(tmp_path)), tmp_path / "unused")
    assert defaults == load_generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 7}
    assert default_sampling(EngineConfig(generation_config="auto"), tmp_path) == defaults
    assert default_sampling(EngineConfig(generation_config="vllm"), tmp_path) == {}
    with pytest.raises(ValueError, match="no generation_config.json"):
        default_sampling(EngineConfig(generation_config=str(tmp_path / "missing")), tmp_path)

    serving = OpenAIServing(SimpleNamespace(tokenizer=None), ServerConfig([MODEL], 64, None, False, defaults))
    messages = [{"role": "user", "content": "hi"}]
    unset = serving.sampling_params(ChatCompletionRequest(messages=messages), None, 10, None)
    assert (unset.temperature, unset.top_p, unset.max_tokens) == (0.6, 0.9, 7)
    explicit = serving.sampling_params(ChatCompletionRequest(messages=messages, temperature=0.0, top_p=1.0), 20, 10, None)
    assert (explicit.temperature, explicit.top_p, explicit.max_tokens) == (0.0, 1.0, 20)
    assert serving.sampling_params(ChatCompletionRequest(messages=messages), None, 60, None).max_tokens == 4


# Chat -------------------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


def test_chat_stream_equals_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    choice_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == whole.choices[0].message.content
    assert choice_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices


def test_chat_n_and_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, logprobs=True, top_logprobs=3, temperature=1.0, seed=3,
        max_completion_tokens=6, extra_body={"ignore_eos": True},
    )
    assert len(out.choices) == 2 and out.usage.completion_tokens == 12
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)


# Errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": "many"}, "n"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [], "max_tokens": 3}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ([1, 2], None),
])
def test_completion_errors(http, body, param):
    openai_error(http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "", "content": "x"}]}, "messages.0.role"),
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
])
def test_chat_errors(http, body, param):
    openai_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_context_length_error_names_both_numbers(http):
    response = http.post("/v1/completions", json={"prompt": "abcd", "max_tokens": MAX_MODEL_LEN})
    error = openai_error(response, 400, "prompt")  # as OpenAI: the prompt is what a client shortens
    assert str(MAX_MODEL_LEN) in error["message"] and str(MAX_MODEL_LEN + 4) in error["message"]


def test_auth_model_and_json_errors_then_stillserving(base, http, client):
    openai_error(httpx.post(f"{base}/v1/completions", json={"prompt": "x"}), 401)
    openai_error(httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}), 401)
    openai_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    openai_error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert client.completions.create(model=MODEL, prompt="still here", **GREEDY).choices[0].text is not None


# Pagoda's own clients ---------------------------------------------------------------------------


def test_chat_cli_quick(base, capsys):
    args = build_parser().parse_args(["chat", "--url", f"{base}/v1", "--api-key", API_KEY, "--max-tokens", "8",
                                      "-q", "Hi"])
    args.func(args)  # the model is random: its reply is some text, then a newline
    out = capsys.readouterr().out
    assert out.endswith("\n")


def test_bench_serve(base):
    args = build_parser().parse_args([
        "bench", "serve", "--base-url", base, "--api-key", API_KEY, "--num-prompts", "6", "--random-input-len", "8",
        "--random-output-len", "5", "--max-concurrency", "3",
    ])
    summary = args.func(args)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 30 and summary["total_input_tokens"] == 48
    # A client behind gets a request's tokens in one event (its deltas joined): on a busy machine
    # every request's may, and then there is no inter-token latency (test_summary_s_latencies).
    assert summary["mean_e2el_ms"] >= summary["mean_ttft_ms"] > 0


def test_summary_s_latencies():
    results = [RequestResult(True, 8, 3, ttft_s=0.010, latency_s=0.030, itl_s=[0.005, 0.015]),
               RequestResult(True, 8, 1, ttft_s=0.020, latency_s=0.020), RequestResult(False, error="HTTP 500")]
    summary = _summary("tiny", results, duration=1.0)
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (2, 1, 4)
    assert summary["mean_ttft_ms"] == pytest.approx(15) and summary["mean_itl_ms"] == pytest.approx(10)
    assert summary["mean_tpot_ms"] == pytest.approx(10)  # (30 - 10) ms over 2 tokens; the 1-token request has none
    one_chunk_each = _summary("tiny", results[1:], duration=1.0)
    assert "mean_itl_ms" not in one_chunk_each and one_chunk_each["mean_ttft_ms"] == pytest.approx(20)


# Disconnects and shutdown -----------------------------------------------------------------------


# Long enough (8 x 1000 tokens) that a client leaving after half a second leaves it unfinished.
LONG = {"prompt": "long", "n": 8, "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def test_disconnect_mid_stream_frees_everything(base, http):
    before = _metrics(http)
    with httpx.Client(base_url=base, headers=http.headers, timeout=30.0) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            running = _metrics(http)
            assert running["pagoda:num_requests_running"] == 8 and running["pagoda:kv_cache_usage_perc"] > 0
    after = _wait_idle(http)
    assert _finished(after, "abort") == _finished(before, "abort") + 8  # aborted, not finished
    assert _finished(after, "length") == _finished(before, "length")


def test_disconnect_before_a_whole_response_frees_everything(base, http):
    """A client that leaves a non-streaming request before its first byte aborts it."""
    before = _metrics(http)
    body = json.dumps({**LONG, "model": MODEL}).encode()
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        deadline = time.monotonic() + 10
        while _metrics(http)["pagoda:num_requests_running"] < 8:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.02)
    after = _wait_idle(http)
    assert _finished(after, "abort") == _finished(before, "abort") + 8
    assert _finished(after, "length") == _finished(before, "length")


def test_sigterm_aborts_and_exits_zero(server, base, http):
    proc = server[0]
    with httpx.Client(base_url=base, headers=http.headers, timeout=30.0) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]  # the stream ends (with an error event) instead of running on
    assert proc.wait(10) == 0 and time.monotonic() - started < 10
    assert rest[-1] == "data: [DONE]"
    assert any("error" in json.loads(line[5:]) for line in rest if line.startswith("data: {"))


# The embedded default model, with its real tokenizer and chat template ---------------------------


@pytest.fixture(scope="module")
def default_server(loader_default_model_dir, tmp_path_factory):
    # No model argument: `pagoda serve` must find the default model in the (test's) cache.
    cache = str(loader_default_model_dir.parent.parent)
    log = tmp_path_factory.mktemp("default-server") / "server.log"
    with serving(["--max-model-len", "1024", "--max-num-seqs", "4"], log, {"PAGODA_CACHE_DIR": cache}) as served:
        yield served


@pytest.mark.slow
def test_default_model_server_answers_paris(default_server):
    _, base = default_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60.0, max_retries=0)
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24)
    assert "Paris" in whole.choices[0].message.content
    stream = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content
    stopped = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24, stop="Paris")
    assert stopped.choices[0].message.content == whole.choices[0].message.content.split("Paris")[0]
    assert stopped.choices[0].finish_reason == "stop"


def test_max_new_tokens_of_a_folder_or_an_override_caps_every_request(tmp_path):
    """As vLLM's override_max_tokens: max_new_tokens caps a request's own max_tokens when it comes
    from a --generation-config folder or --override-generation-config; the model's own is a default."""
    from pagoda.config.resolve import max_tokens_cap

    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))

    def cap(config: EngineConfig) -> int | None:
        return max_tokens_cap(config, default_sampling(config, tmp_path))

    assert cap(EngineConfig(generation_config=str(tmp_path))) == 7
    assert cap(EngineConfig(generation_config="auto")) is None  # the model's own: a default only
    assert cap(EngineConfig(override_generation_config={"max_new_tokens": 5})) == 5
    serving = OpenAIServing(SimpleNamespace(tokenizer=None), ServerConfig([MODEL], 64, None, False, max_tokens_cap=7))
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert serving.sampling_params(request, 20, 10, None).max_tokens == 7
    assert serving.sampling_params(request, 3, 10, None).max_tokens == 3
