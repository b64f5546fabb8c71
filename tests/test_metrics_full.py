"""Every metric the README lists, read from `pagoda serve`'s /metrics after known traffic (a
preemption forced by a tiny KV cache included), its counts checked against what was sent; and the
same metrics under vLLM's vllm: names with --metrics-vllm-names, and only then."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.async_llm import EngineCounters
from pagoda.entrypoints.openai.metrics import metrics_registry
from tests.serving import MODEL, SPECIALS, serving, tiny_model_args

README = Path(__file__).resolve().parent.parent / "README.md"
NUM_BLOCKS = 6  # of 16 tokens: two requests of 50 tokens cannot run side by side
VOCAB_SIZE = len(SPECIALS) + 256


def listed_metrics() -> list[str]:
    """The README's metrics but the speculative-decoding ones, which a server has only with
    --speculative-config (tests/test_spec_ngram.py reads those)."""
    names = re.findall(r"^\| `(pagoda:\w+)` \|", README.read_text(), flags=re.MULTILINE)
    assert len(names) >= 25
    return [name for name in names if not name.startswith("pagoda:spec_decode_")]


def scrape(http: httpx.Client) -> tuple[dict[str, float], set[str]]:
    """Each sample keyed by name{labels but model_name}, and every family and sample name."""
    values, names = {}, set()
    for family in text_string_to_metric_families(http.get("/metrics").text):
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
            labels = dict(sample.labels)
            assert labels.pop("model_name") == MODEL
            if sample.name.endswith("cache_config_info"):
                labels = {}  # checked apart
            key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            values[f"{sample.name}{{{key}}}" if key else sample.name] = sample.value
    return values, names


def complete(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("metrics"))


def test_every_listed_metric_counts_what_was_sent(model_args, tmp_path):
    args = [*model_args, "--num-gpu-blocks-override", str(NUM_BLOCKS), "--metrics-vllm-names"]
    with serving(args, tmp_path / "log") as (_, base), httpx.Client(base_url=base, timeout=60) as http:
        # One at a time, one choice each: every step computes what the figures below say.
        sent = [
            complete(http, {"prompt": "first", "max_tokens": 6, "ignore_eos": True}),
            complete(http, {"prompt": "second one", "max_tokens": 3, "ignore_eos": True}),
            complete(http, {"prompt": "s", "max_tokens": 5, "stop_token_ids": list(range(VOCAB_SIZE))}),
        ]
        chat = http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True,
        })
        assert chat.status_code == 200, chat.text
        sent.append(chat.json())
        m, _ = scrape(http)
        prompt = sum(r["usage"]["prompt_tokens"] for r in sent)
        generated = sum(r["usage"]["completion_tokens"] for r in sent)
        assert generated == 6 + 3 + 1 + 4
        assert m["pagoda:prompt_tokens_total"] == prompt
        assert m["pagoda:generation_tokens_total"] == generated
        # Each prompt token not served by the prefix cache, then each output token but the last.
        assert m["pagoda:iteration_tokens_total_sum"] == prompt - m["pagoda:prefix_cache_hits_total"] + generated - 4
        assert m["pagoda:inter_token_latency_seconds_count"] == generated - 4  # one token a step
        assert m["pagoda:request_prompt_tokens_sum"] == prompt
        assert m["pagoda:request_generation_tokens_sum"] == generated
        assert m["pagoda:request_time_per_output_token_seconds_count"] == 3  # not the 1-token one

        # n=2: one request, two choices.
        sent.append(complete(http, {"prompt": "two", "max_tokens": 4, "n": 2, "temperature": 1, "ignore_eos": True}))
        # Two requests of 50 tokens at once need 8 blocks: one is preempted, recomputed, finished.
        racers = [None, None]

        def race(i: int) -> None:
            racers[i] = complete(http, {"prompt": f"race {i} .", "max_tokens": 42, "ignore_eos": True})

        threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        sent += racers
        assert all(r["usage"]["completion_tokens"] == 42 for r in racers)

        m, names = scrape(http)
        for name in listed_metrics():
            assert name in names, f"{name} is in the README but not in /metrics"
            assert f"vllm:{name.removeprefix('pagoda:')}" in names, name
        num_requests = len(sent)
        choices = [c for r in sent for c in r["choices"]]
        assert m["pagoda:num_preemptions_total"] >= 1
        assert m["pagoda:request_success_total{finished_reason=length}"] == len(choices) - 1
        assert m["pagoda:request_success_total{finished_reason=stop}"] == 1
        assert m["pagoda:request_success_total{finished_reason=abort}"] == 0
        for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                     "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                     "request_prompt_tokens", "request_generation_tokens", "request_max_num_generation_tokens",
                     "request_params_n", "request_params_max_tokens", "time_per_prefill_token_request_seconds"):
            assert m[f"pagoda:{name}_count"] == num_requests, name
            assert m[f"pagoda:{name}_bucket{{le=+Inf}}"] == num_requests, name
        assert m["pagoda:request_params_n_sum"] == num_requests + 1
        assert m["pagoda:request_params_max_tokens_sum"] == 6 + 3 + 5 + 4 + 4 + 42 + 42
        assert m["pagoda:gpu_cache_usage_perc"] == m["pagoda:kv_cache_usage_perc"]
        assert m["pagoda:gpu_prefix_cache_hits_total"] == m["pagoda:prefix_cache_hits_total"]
        assert m["pagoda:request_max_num_generation_tokens_sum"] == 6 + 3 + 1 + 4 + 4 + 42 + 42
        assert m["pagoda:request_generation_tokens_sum"] == sum(r["usage"]["completion_tokens"] for r in sent)
        assert m["pagoda:time_per_output_token_seconds_count"] == m["pagoda:inter_token_latency_seconds_count"]
        # Inference is prefill then decode; the end-to-end time holds the queue time too.
        assert m["pagoda:request_inference_time_seconds_sum"] == pytest.approx(
            m["pagoda:request_prefill_time_seconds_sum"] + m["pagoda:request_decode_time_seconds_sum"])
        assert m["pagoda:e2e_request_latency_seconds_sum"] >= m["pagoda:request_inference_time_seconds_sum"]
        assert m["pagoda:num_requests_waiting_by_reason{reason=capacity}"] == m["pagoda:num_requests_waiting"]
        assert m["pagoda:num_requests_waiting_by_reason{reason=deferred}"] == 0
        info = http.get("/metrics").text
        assert re.search(r'pagoda:cache_config_info\{[^}]*block_size="16"[^}]*num_gpu_blocks="6"', info)
        # The vllm: names carry the same series.
        for key, value in m.items():
            if key.startswith("pagoda:"):
                assert m["vllm:" + key.removeprefix("pagoda:")] == value, key


def test_vllm_names_only_with_the_flag():
    engine = SimpleNamespace(
        stats=SchedulerStats(1, 2, 0.5, 10, 4, 3), counters=EngineCounters(7, 9), requests_per_core=[5],
        config=SimpleNamespace(speculative=None, cache=SimpleNamespace(
            block_size=16, num_gpu_blocks_override=None, gpu_memory_utilization=0.9, kv_cache_memory_bytes=None,
            enable_prefix_caching=True,
        )), num_gpu_blocks=6, max_model_len=64, finished_listeners=[], iteration_listeners=[],
    )
    plain = generate_latest(metrics_registry(engine, MODEL)).decode()
    both = generate_latest(metrics_registry(engine, MODEL, vllm_names=True)).decode()
    assert 'pagoda:num_preemptions_total{model_name="tiny"} 3.0' in plain and "vllm:" not in plain
    assert plain in both
    assert both.replace("vllm:", "pagoda:") == plain + plain


def test_grafana_dashboard_reads_listed_metrics():
    dashboard = (README.parent / "examples" / "grafana" / "pagoda-dashboard.json").read_text()
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"pagoda:\w+", dashboard)}
    assert len(used) >= 15 and used <= set(listed_metrics())
