"""Turns sampled tokens into what users see: text (incremental, with stop strings), logprobs,
and one RequestOutput per user request, gathering the n children of an n>1 request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagoda.core.request import Request
from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagoda.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from pagoda.sample.sampler import TopLogprobs


@dataclass
class _Child:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    finished_children: set[int] = field(default_factory=set)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, tuple[_Parent, _Child]] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        first = children[0]
        params = first.sampling_params
        parent = _Parent(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=first.prompt_token_ids,
            children=[],
            metrics=RequestMetrics(arrival_time=time.time()),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        for index, req in enumerate(children):
            child = _Child(
                index=index,
                request=req,
                detokenizer=self._detokenizer(req),
                logprobs=[] if req.sampling_params.logprobs is not None else None,
            )
            parent.children.append(child)
            self.child_to_parent[req.request_id] = (parent, child)
        self.parents[request_id] = parent

    def _detokenizer(self, req: Request) -> IncrementalDetokenizer | None:
        if self.tokenizer is None or not req.sampling_params.detokenize:
            return None
        return IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.sampling_params)

    def process_token(
        self, req: Request, token_id: int, logprob: float, top: TopLogprobs | None
    ) -> str | None:
        """Record a child's new token; returns a stop string if the text now ends the request."""
        parent, child = self.child_to_parent[req.request_id]
        now = time.time()
        if parent.metrics.first_token_time is None:
            parent.metrics.first_token_time = now
        child.cumulative_logprob += logprob
        if child.logprobs is not None and top is not None:
            child.logprobs.append(self._position_logprobs(top))
        if child.detokenizer is None:
            return None
        return child.detokenizer.append([token_id], req.num_output_tokens)

    def process_prompt_logprobs(self, req: Request, first_token: int, positions: list[TopLogprobs]) -> None:
        """Logprobs of prompt tokens first_token, first_token + 1, ... (token 0 has none)."""
        parent, child = self.child_to_parent[req.request_id]
        if child.index != 0 or parent.prompt_logprobs is None:
            return
        # A preempted request recomputes its prompt: keep only positions not yet recorded.
        for token_index, top in enumerate(positions, start=first_token):
            if token_index == len(parent.prompt_logprobs):
                parent.prompt_logprobs.append(self._position_logprobs(top))

    def mark_scheduled(self, req: Request) -> None:
        parent, _ = self.child_to_parent[req.request_id]
        if parent.metrics.first_scheduled_time is None:
            parent.metrics.first_scheduled_time = time.time()
        parent.num_cached_tokens = max(parent.num_cached_tokens, req.num_cached_tokens)

    def finish(self, req: Request) -> None:
        parent, child = self.child_to_parent[req.request_id]
        child.finish_reason = req.status.finish_reason
        parent.finished_children.add(child.index)
        del self.child_to_parent[req.request_id]
        if len(parent.finished_children) == len(parent.children):
            parent.metrics.finished_time = time.time()

    def make_output(self, request_id: str) -> RequestOutput:
        parent = self.parents[request_id]
        finished = len(parent.finished_children) == len(parent.children)
        if finished:
            del self.parents[request_id]
        return RequestOutput(
            request_id=request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=[self._completion(c) for c in parent.children],
            finished=finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.num_cached_tokens,
        )

    def parent_id(self, req: Request) -> str:
        return self.child_to_parent[req.request_id][0].request_id

    def _completion(self, child: _Child) -> CompletionOutput:
        req = child.request
        return CompletionOutput(
            index=child.index,
            text=child.detokenizer.output_text if child.detokenizer else "",
            token_ids=list(req.output_token_ids),
            cumulative_logprob=child.cumulative_logprob if child.logprobs is not None else None,
            logprobs=child.logprobs,
            finish_reason=child.finish_reason,
            stop_reason=req.stop_reason,
            text_delta=child.detokenizer.take_delta(child.finish_reason is not None) if child.detokenizer else "",
        )

    def _position_logprobs(self, top: TopLogprobs) -> PositionLogprobs:
        out: PositionLogprobs = {}
        for token_id, logprob, rank in zip(top.token_ids, top.logprobs, top.ranks):
            text = decode_token(self.tokenizer, token_id) if self.tokenizer is not None else None
            out.setdefault(token_id, Logprob(logprob=logprob, rank=rank, decoded_token=text))
        return out

