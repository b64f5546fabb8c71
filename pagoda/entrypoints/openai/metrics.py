"""Prometheus metrics (vLLM's names prefixed pagoda:, and also vllm: with --metrics-vllm-names) and
the periodic stats log line. Gauges and totals are read from the engine's latest snapshot, so
scraping never waits on the engine; per-request histograms are observed as each request ends, per-step
ones (iteration tokens, inter-token latency) as each step's outputs arrive. With several engine cores
(data parallelism) the figures are their sums, and engine_core_requests_total{engine} shows how
the requests were spread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.output_processor import IterationStats
from pagoda.outputs import RequestOutput

logger = logging.getLogger("pagoda.server")

PREFIX, VLLM_PREFIX = "pagoda:", "vllm:"
# vLLM's buckets, so that dashboards made for it read these the same way.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_N_BUCKETS = [1, 2, 5, 10, 20]
_PREFILL_TOKEN_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
FINISH_REASONS = ("stop", "length", "abort")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets of token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


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
        by_reason = GaugeMetricFamily(f"{PREFIX}num_requests_waiting_by_reason", "Waiting requests by reason: "
                                      "capacity (for room in the batch or the KV cache), deferred (never, here).",
                                      labels=[*self.labels, "reason"])
        # Pagoda defers no request (no LoRA budget, no KV transfer): every one waits for capacity.
        for reason, count in (("capacity", stats.num_waiting), ("deferred", 0)):
            by_reason.add_metric([*self.labels.values(), reason], count)
        yield by_reason
        yield self._metric(GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                           stats.kv_cache_usage)
        # vLLM's names before 0.9, which older dashboards read.
        yield self._metric(GaugeMetricFamily, "gpu_cache_usage_perc", "Deprecated: kv_cache_usage_perc.",
                           stats.kv_cache_usage)
        yield self._metric(CounterMetricFamily, "prompt_tokens", "Prompt tokens of accepted requests.",
                           counters.prompt_tokens)
        yield self._metric(CounterMetricFamily, "prompt_image_tokens",
                           "Prompt tokens of accepted requests that stand for images (part of prompt_tokens).",
                           counters.prompt_image_tokens)
        yield self._metric(CounterMetricFamily, "generation_tokens", "Tokens generated.", counters.generation_tokens)
        yield self._metric(CounterMetricFamily, "num_preemptions", "Requests preempted.", stats.num_preemptions)
        yield self._metric(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                           stats.prefix_cache_queries)
        yield self._metric(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                           stats.prefix_cache_hits)
        yield self._metric(CounterMetricFamily, "gpu_prefix_cache_queries", "Deprecated: prefix_cache_queries.",
                           stats.prefix_cache_queries)
        yield self._metric(CounterMetricFamily, "gpu_prefix_cache_hits", "Deprecated: prefix_cache_hits.",
                           stats.prefix_cache_hits)
        if self.engine.config.speculative is not None:
            yield from self._spec_decode(stats)
        per_core = CounterMetricFamily(f"{PREFIX}engine_core_requests", "Engine requests sent to each engine core "
                                       "(data-parallel rank).", labels=[*self.labels, "engine"])
        for index, count in enumerate(self.engine.requests_per_core):
            per_core.add_metric([*self.labels.values(), str(index)], count)
        yield per_core

    def _spec_decode(self, stats: SchedulerStats) -> Iterator[Metric]:
        yield self._metric(CounterMetricFamily, "spec_decode_num_drafts", "Request steps that verified drafts.",
                           stats.num_drafts)
        yield self._metric(CounterMetricFamily, "spec_decode_num_draft_tokens", "Draft tokens verified.",
                           stats.num_draft_tokens)
        yield self._metric(CounterMetricFamily, "spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                           stats.num_accepted_tokens)
        per_pos = CounterMetricFamily(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted "
                                      "at each position of the drafts (0: the first).", labels=[*self.labels, "position"])
        for position, count in enumerate(stats.num_accepted_tokens_per_pos):
            per_pos.add_metric([*self.labels.values(), str(position)], count)
        yield per_pos

    def _metric(self, family: type, name: str, documentation: str, value: float) -> Metric:
        metric = family(f"{PREFIX}{name}", documentation, labels=list(self.labels))
        metric.add_metric(list(self.labels.values()), value)
        return metric


class ObservedMetrics:
    """The histograms and the finish-reason counter, fed each request's final output and each
    engine step's IterationStats."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        def histogram(name: str, documentation: str, buckets: list[float]) -> Histogram:
            metric = Histogram(f"{PREFIX}{name}", documentation, ["model_name"], buckets=buckets, registry=registry)
            return metric.labels(model_name)

        token_buckets = build_1_2_5_buckets(max_model_len)
        # Per engine step
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per engine step.",
                                          _ITERATION_TOKEN_BUCKETS)
        self.inter_token = histogram("inter_token_latency_seconds",
                                     "Per step and request: seconds since the request's previous tokens.",
                                     _TPOT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "The same as inter_token_latency_seconds (vLLM's older name).", _TPOT_BUCKETS)
        # Per request (each prompt; its n choices together)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds",
                                      "Per request: first token to last, over the tokens after the first.",
                                      _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled (waiting).",
                               _LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "First scheduled to last token (running).",
                                   _LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled to first token (prefill).",
                                 _LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token to last token (decode).",
                                _LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.generation_tokens = histogram("request_generation_tokens", "Tokens generated per request (its n "
                                           "choices together).", token_buckets)
        self.max_generation_tokens = histogram("request_max_num_generation_tokens",
                                               "Per request: the most tokens any of its choices generated.",
                                               token_buckets)
        self.n = histogram("request_params_n", "The n request parameter.", _N_BUCKETS)
        self.max_tokens = histogram("request_params_max_tokens", "The max_tokens request parameter (when set).",
                                    token_buckets)
        self.prefill_per_token = histogram("time_per_prefill_token_request_seconds",
                                           "Per request: prefill time over its prompt tokens.", _PREFILL_TOKEN_BUCKETS)
        success = Counter(f"{PREFIX}request_success", "Finished requests (each of n choices), by finish reason.",
                          ["model_name", "finished_reason"], registry=registry)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}

    def observe_iteration(self, stats: IterationStats) -> None:
        if stats.num_batched_tokens:
            self.iteration_tokens.observe(stats.num_batched_tokens)
        for latency in stats.inter_token_latencies:
            self.inter_token.observe(latency)
            self.tpot.observe(latency)

    def observe_finished(self, output: RequestOutput) -> None:
        reasons = [c.finish_reason for c in output.outputs]
        for reason in reasons:
            self.success[reason].inc()
        if "abort" in reasons:
            return  # an aborted request's times and sizes measure its client, not the server
        num_tokens = [len(c.token_ids) for c in output.outputs]
        self.prompt_tokens.observe(len(output.prompt_token_ids))
        self.generation_tokens.observe(sum(num_tokens))
        self.max_generation_tokens.observe(max(num_tokens))
        self.n.observe(len(output.outputs))
        m = output.metrics
        if m.max_tokens:
            self.max_tokens.observe(m.max_tokens)
        self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is None or m.first_token_time is None:
            return
        self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        self.inference.observe(max(0.0, m.finished_time - m.first_scheduled_time))
        self.prefill.observe(max(0.0, m.first_token_time - m.first_scheduled_time))
        if output.prompt_token_ids:
            self.prefill_per_token.observe(max(0.0, m.first_token_time - m.first_scheduled_time)
                                           / len(output.prompt_token_ids))
        self.decode.observe(m.finished_time - m.first_token_time)
        self.ttft.observe(m.first_token_time - m.arrival_time)
        if max(num_tokens) > 1:
            self.request_tpot.observe((m.finished_time - m.first_token_time) / (max(num_tokens) - 1))


class VllmNames:
    """Every pagoda: metric of a registry again under vLLM's vllm: prefix, so that dashboards and
    alerts made for vLLM read Pagoda unchanged (--metrics-vllm-names)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            renamed = Metric(_vllm_name(family.name), family.documentation, family.type, family.unit)
            renamed.samples = [sample._replace(name=_vllm_name(sample.name)) for sample in family.samples]
            yield renamed


def _vllm_name(name: str) -> str:
    return VLLM_PREFIX + name.removeprefix(PREFIX)


def metrics_registry(engine: AsyncLLM, model_name: str, vllm_names: bool = False) -> CollectorRegistry:
    """A registry of the engine's metrics (with vllm_names: each also as vllm:...); from now on
    every engine step and every request that ends is observed."""
    prometheus_client.disable_created_metrics()  # no *_created series, as in vLLM
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, model_name))
    _cache_config_info(registry, engine, model_name)
    observer = ObservedMetrics(registry, model_name, engine.max_model_len)
    engine.finished_listeners.append(observer.observe_finished)
    engine.iteration_listeners.append(observer.observe_iteration)
    if not vllm_names:
        return registry
    exported = CollectorRegistry()
    exported.register(registry)
    exported.register(VllmNames(registry))
    return exported


def _cache_config_info(registry: CollectorRegistry, engine: AsyncLLM, model_name: str) -> None:
    """vLLM's cache_config_info: a gauge of 1 whose labels are the KV cache's settings."""
    config = engine.config.cache
    info = {
        "block_size": config.block_size, "num_gpu_blocks": engine.num_gpu_blocks,
        "num_gpu_blocks_override": config.num_gpu_blocks_override,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
        "enable_prefix_caching": config.enable_prefix_caching,
    }
    gauge = Gauge(f"{PREFIX}cache_config_info", "The KV cache's settings (in the labels).",
                  ["model_name", *info], registry=registry)
    gauge.labels(model_name, *(str(value) for value in info.values())).set(1)


async def log_stats(engine: AsyncLLM, interval: float = 10.0) -> None:
    """Every interval seconds while there is traffic, as vLLM logs it: throughput over the
    interval, queue lengths, KV usage and the interval's prefix-cache hit rate; with speculative
    decoding, a second line: the interval's mean acceptance length (tokens a verifying step gave
    a request) and acceptance rate."""
    last = _totals(engine)
    while True:
        await asyncio.sleep(interval)
        now, stats = _totals(engine), engine.stats
        prompt, generation, queries, hits, drafts, draft_tokens, accepted = (b - a for a, b in zip(last, now))
        if prompt or generation or stats.num_running or stats.num_waiting:
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                prompt / interval, generation / interval, stats.num_running, stats.num_waiting,
                100 * stats.kv_cache_usage, 100 * hits / queries if queries else 0.0,
            )
        if drafts:
            logger.info(
                "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted: %d tokens, Drafted: %d tokens, "
                "Avg Draft acceptance rate: %.1f%%", 1 + accepted / drafts, accepted, draft_tokens,
                100 * accepted / draft_tokens,
            )
        last = now


def _totals(engine: AsyncLLM) -> tuple[int, ...]:
    counters, stats = engine.counters, engine.stats
    return (counters.prompt_tokens, counters.generation_tokens, stats.prefix_cache_queries, stats.prefix_cache_hits,
            stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
