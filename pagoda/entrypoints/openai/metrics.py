"""Prometheus metrics (names prefixed pagoda:, as vLLM's are vllm:) and the periodic stats log
line. Gauges and totals are read from the engine's latest snapshot, so scraping never waits on
the engine; per-request histograms are observed as each request ends. With several engine cores
(data parallelism) the figures are their sums, and engine_core_requests_total{engine} shows how
the requests were spread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pagoda.engine.async_llm import AsyncLLM
from pagoda.outputs import RequestOutput

logger = logging.getLogger("pagoda.server")

# vLLM's buckets, so that dashboards made for it read these the same way.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")


class EngineCollector:
    """Gauges and totals from the engine's latest snapshot."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def collect(self) -> Iterator[Metric]:
        stats, counters = self.engine.stats, self.engine.counters
        yield self._metric(GaugeMetricFamily, "num_requests_running", "Requests in the running batch.",
                           stats.num_running)
        yield self._metric(GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled.",
                           stats.num_waiting)
        yield self._metric(GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                           stats.kv_cache_usage)
        yield self._metric(CounterMetricFamily, "prompt_tokens", "Prompt tokens of accepted requests.",
                           counters.prompt_tokens)
        yield self._metric(CounterMetricFamily, "generation_tokens", "Tokens generated.", counters.generation_tokens)
        yield self._metric(CounterMetricFamily, "num_preemptions", "Requests preempted.", stats.num_preemptions)
        yield self._metric(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                           stats.prefix_cache_queries)
        yield self._metric(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                           stats.prefix_cache_hits)
        per_core = CounterMetricFamily("pagoda:engine_core_requests", "Engine requests sent to each engine core "
                                       "(data-parallel rank).", labels=[*self.labels, "engine"])
        for index, count in enumerate(self.engine.requests_per_core):
            per_core.add_metric([*self.labels.values(), str(index)], count)
        yield per_core

    def _metric(self, family: type, name: str, documentation: str, value: float) -> Metric:
        metric = family(f"pagoda:{name}", documentation, labels=list(self.labels))
        metric.add_metric(list(self.labels.values()), value)
        return metric


class RequestMetrics:
    """Per-request histograms and the finish-reason counter, fed each request's final output."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        def histogram(name: str, documentation: str, buckets: list[float]) -> Histogram:
            metric = Histogram(f"pagoda:{name}", documentation, ["model_name"], buckets=buckets, registry=registry)
            return metric.labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Per request: first token to last, over the tokens after the first.", _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS)
        success = Counter("pagoda:request_success", "Finished requests (each of n choices), by finish reason.",
                          ["model_name", "finished_reason"], registry=registry)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}

    def observe(self, output: RequestOutput) -> None:
        reasons = [c.finish_reason for c in output.outputs]
        for reason in reasons:
            self.success[reason].inc()
        if "abort" in reasons:
            return  # an aborted request's times measure its client, not the server
        m = output.metrics
        self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        num_tokens = max(len(c.token_ids) for c in output.outputs)
        if num_tokens > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (num_tokens - 1))


def metrics_registry(engine: AsyncLLM, model_name: str) -> CollectorRegistry:
    """A registry of the engine's metrics; from now on every request that ends is observed."""
    prometheus_client.disable_created_metrics()  # no *_created series, as in vLLM
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, model_name))
    engine.finished_listeners.append(RequestMetrics(registry, model_name).observe)
    return registry


async def log_stats(engine: AsyncLLM, interval: float = 10.0) -> None:
    """Every interval seconds while there is traffic, as vLLM logs it: throughput over the
    interval, queue lengths, KV usage and the interval's prefix-cache hit rate."""
    last = _totals(engine)
    while True:
        await asyncio.sleep(interval)
        now, stats = _totals(engine), engine.stats
        prompt, generation, queries, hits = (b - a for a, b in zip(last, now))
        if prompt or generation or stats.num_running or stats.num_waiting:
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                prompt / interval, generation / interval, stats.num_running, stats.num_waiting,
                100 * stats.kv_cache_usage, 100 * hits / queries if queries else 0.0,
            )
        last = now


def _totals(engine: AsyncLLM) -> tuple[int, int, int, int]:
    counters, stats = engine.counters, engine.stats
    return counters.prompt_tokens, counters.generation_tokens, stats.prefix_cache_queries, stats.prefix_cache_hits
