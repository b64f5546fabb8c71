"""The output side of the front end: what the engine core reports each step (new token ids, raw
logprobs, finish reasons) turned into what users see: text (incremental, with stop strings),
logprobs with their token text, and one RequestOutput per user request (its n engine requests
gathered; an embedding engine's with the prompt's pooled vector). It runs where the tokenizer is, in the front end: LLMEngine offline, AsyncLLM in the
server process; the server's metrics also get each step's IterationStats from it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagoda.engine.messages import CoreOutput, EngineRequest, Outputs
from pagoda.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from pagoda.sample.top_logprobs import TopLogprobs
from pagoda.sampling_params import SamplingParams


@dataclass
class _Child:
    index: int
    request_id: str
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_time: float | None = None  # when the core made its latest tokens
    pooled: list[float] | None = None  # an embedding engine's vector of the prompt


@dataclass
class IterationStats:
    """What one engine step did, as the front end saw it: for the server's per-step metrics."""

    num_batched_tokens: int  # tokens the step computed (prompt chunks, decodes, drafts)
    # Per engine request that got tokens after its first ones: seconds since its previous ones
    # (between the core's steps that made them).
    inter_token_latencies: list[float] = field(default_factory=list)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_cached_tokens: int = 0
    final_only: bool = False  # no output until it finishes (offline generate reads only those)
    # What its outputs carry of metrics: a copy, as a consumer may read an output after later
    # steps; made again only when metrics change (three times a request), not every step.
    metrics_copy: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    def metrics_view(self) -> RequestMetrics:
        if self.metrics_copy is None:
            self.metrics_copy = dataclasses.replace(self.metrics)
        return self.metrics_copy


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self._live: dict[str, tuple[_Parent, _Child]] = {}  # engine request id -> its unfinished child

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], children: list[EngineRequest],
        arrival_time: float | None = None,
        final_only: bool = False,
    ) -> None:
        """Track a user request whose engine requests (fan_out) the core has taken. With
        `final_only`, `process` makes its RequestOutput once, when it finishes: building one per
        step copies every token so far, quadratic in the output length."""
        params = children[0][1]
        parent = _Parent(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, children=[],
            metrics=RequestMetrics(
                arrival_time=time.time() if arrival_time is None else arrival_time, max_tokens=params.max_tokens
            ),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None, final_only=final_only,
        )
        for index, (child_id, child_params) in enumerate(children):
            child = _Child(
                index=index, request_id=child_id, params=child_params,
                detokenizer=self._detokenizer(prompt_token_ids, child_params),
                logprobs=[] if child_params.logprobs is not None else None,
            )
            parent.children.append(child)
            self._live[child_id] = (parent, child)
        self.parents[request_id] = parent

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def _detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None or not params.detokenize:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)

    def process(
        self, step: Outputs, stats: IterationStats | None = None
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's core outputs (recording its inter-token latencies in stats, when
        given). Returns the outputs of the user requests they advanced, and the engine requests a
        stop string ended here, which the core must stop too."""
        return self.process_steps([(step, stats)])

    def process_steps(
        self, steps: list[tuple[Outputs, IterationStats | None]]
    ) -> tuple[list[RequestOutput], list[str]]:
        """As process, for successive steps applied in order (a stop string ends a request at
        the step it comes in), with one output per user request they advanced."""
        # Each user request advanced, with the core's time of the latest step that did: its
        # finish time if it ended.
        touched: dict[str, tuple[_Parent, float]] = {}
        stopped: list[str] = []
        for step, stats in steps:
            for out in step.outputs:
                entry = self._live.get(out.request_id)
                if entry is None:  # ended here (a stop string, an abort) before the core knew
                    continue
                parent, child = entry
                if self._apply(parent, child, out, step.timestamp, stats):
                    stopped.append(child.request_id)
                touched[parent.request_id] = parent, step.timestamp
        outputs = [self._output(p, t) for p, t in touched.values() if not p.final_only or p.finished]
        return outputs, stopped

    def live_children(self, request_ids: Iterable[str]) -> list[str]:
        """The unfinished engine requests of these user requests; unknown ids are ignored."""
        parents = [self.parents[r] for r in request_ids if r in self.parents]
        return [c.request_id for p in parents for c in p.children if c.request_id in self._live]

    def abort(self, engine_request_ids: Iterable[str]) -> list[RequestOutput]:
        """End these engine requests as aborted; returns the final outputs of the user requests
        that thereby ended. Ids already ended are ignored."""
        touched: dict[str, _Parent] = {}
        for request_id in engine_request_ids:
            entry = self._live.pop(request_id, None)
            if entry is not None:
                parent, child = entry
                child.finish_reason = "abort"
                touched[parent.request_id] = parent
        # An abort comes with no core time: the front end's clock says when it ended.
        now = time.time()
        return [self._output(p, now) for p in touched.values() if p.finished]

    # Per step ---------------------------------------------------------------------------------

    def _apply(
        self, parent: _Parent, child: _Child, out: CoreOutput, core_time: float, stats: IterationStats | None
    ) -> bool:
        """Record one core output, made at core_time; True when a stop string ended the child here
        (the core goes on until told)."""
        self._record_metrics(parent, out, core_time)
        self._record_latency(child, out, core_time, stats)
        self._record_prompt_logprobs(parent, child, out)
        stop = self._record_tokens(child, out)
        if out.pooled is not None:
            child.pooled = out.pooled
        stopped_here = False
        if stop is not None:
            stopped_here = child.finish_reason is None
            child.finish_reason, child.stop_reason = "stop", stop  # wins over a length limit
        if child.finish_reason is not None:
            del self._live[child.request_id]
        return stopped_here

    def _record_metrics(self, parent: _Parent, out: CoreOutput, core_time: float) -> None:
        metrics = parent.metrics
        if metrics.first_scheduled_time is None and out.first_scheduled_time is not None:
            metrics.first_scheduled_time = out.first_scheduled_time
            parent.metrics_copy = None
        if metrics.first_token_time is None and out.new_token_ids:
            metrics.first_token_time = core_time
            parent.metrics_copy = None
        parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)

    def _record_latency(self, child: _Child, out: CoreOutput, core_time: float, stats: IterationStats | None) -> None:
        if not out.new_token_ids:
            return
        if stats is not None and child.last_token_time is not None:
            stats.inter_token_latencies.append(core_time - child.last_token_time)
        child.last_token_time = core_time

    def _record_prompt_logprobs(self, parent: _Parent, child: _Child, out: CoreOutput) -> None:
        """Logprobs of prompt tokens first, first + 1, ... (token 0 has none)."""
        if out.prompt_logprobs is None or child.index != 0 or parent.prompt_logprobs is None:
            return
        first, positions = out.prompt_logprobs
        # A preempted request recomputes its prompt: keep only positions not yet recorded.
        for token_index, top in enumerate(positions, start=first):
            if token_index == len(parent.prompt_logprobs):
                parent.prompt_logprobs.append(self._position_logprobs(top))

    def _record_tokens(self, child: _Child, out: CoreOutput) -> str | None:
        """Append the new tokens; returns the stop string the text now ends with, if any."""
        child.token_ids.extend(out.new_token_ids)
        for top in out.new_logprobs or []:
            child.cumulative_logprob += top.logprobs[0]
            if child.logprobs is not None:
                child.logprobs.append(self._position_logprobs(top))
        child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        if child.detokenizer is None or not out.new_token_ids:
            return None
        text_ids = out.new_token_ids
        if out.finish_reason == "stop" and not child.params.include_stop_str_in_output:
            # As in vLLM, the stop token (EOS or a stop_token_ids entry) is not part of the text,
            # even with skip_special_tokens=False (which tool-call parsers need).
            text_ids = text_ids[:-1]
        return child.detokenizer.append(text_ids, len(child.token_ids))

    def _output(self, parent: _Parent, finished_time: float) -> RequestOutput:
        """finished_time: the request's, if it has finished."""
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = finished_time
            parent.metrics_copy = None
            del self.parents[parent.request_id]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=[self._completion(c) for c in parent.children],
            finished=finished,
            metrics=parent.metrics_view(),
            num_cached_tokens=parent.num_cached_tokens,
            pooled=parent.children[0].pooled,
        )

    def _completion(self, child: _Child) -> CompletionOutput:
        # Copies: a consumer may read an output after later steps have arrived.
        detokenizer = child.detokenizer
        return CompletionOutput(
            index=child.index,
            text=detokenizer.output_text if detokenizer else "",
            token_ids=list(child.token_ids),
            cumulative_logprob=child.cumulative_logprob if child.logprobs is not None else None,
            logprobs=None if child.logprobs is None else list(child.logprobs),
            finish_reason=child.finish_reason,
            stop_reason=child.stop_reason,
            text_delta=detokenizer.take_delta(child.finish_reason is not None) if detokenizer else "",
        )

    def _position_logprobs(self, top: TopLogprobs) -> PositionLogprobs:
        out: PositionLogprobs = {}
        for token_id, logprob, rank in zip(top.token_ids, top.logprobs, top.ranks):
            text = decode_token(self.tokenizer, token_id) if self.tokenizer is not None else None
            out.setdefault(token_id, Logprob(logprob=logprob, rank=rank, decoded_token=text))
        return out
