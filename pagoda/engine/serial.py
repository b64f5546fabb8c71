"""msgpack encoding of what crosses the engine-core process boundary: SamplingParams in,
RequestOutputs and SchedulerStats out. Dataclasses travel as lists of their fields, in order."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from pagoda.core.scheduler import SchedulerStats
from pagoda.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from pagoda.sampling_params import SamplingParams


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # Logprob maps are keyed by token id: int keys must be allowed.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_params(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def decode_params(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)


def encode_stats(stats: SchedulerStats) -> list[Any]:
    return list(dataclasses.astuple(stats))


def decode_stats(fields: list[Any]) -> SchedulerStats:
    return SchedulerStats(*fields)


class OutputEncoder:
    """Core side: each RequestOutput as what is new since the request's previous one (tokens,
    logprobs, text delta; the prompt only the first time), so the bytes sent per step do not grow
    with the length of the outputs."""

    def __init__(self) -> None:
        self._sent: dict[str, list[int]] = {}  # request id -> output tokens sent, per child

    def encode(self, output: RequestOutput) -> list[Any]:
        first = output.request_id not in self._sent
        sent = self._sent.setdefault(output.request_id, [0] * len(output.outputs))
        completions = []
        for c in output.outputs:
            start, sent[c.index] = sent[c.index], len(c.token_ids)
            new_logprobs = None if c.logprobs is None else _encode_positions(c.logprobs[start:])
            completions.append([
                c.index, c.token_ids[start:], c.cumulative_logprob, new_logprobs, c.finish_reason, c.stop_reason,
                c.text_delta,
            ])
        if output.finished:
            del self._sent[output.request_id]
        prompt = [output.prompt, output.prompt_token_ids, _encode_positions(output.prompt_logprobs)] if first else None
        return [
            output.request_id, prompt, completions, output.finished, list(dataclasses.astuple(output.metrics)),
            output.num_cached_tokens,
        ]

    def forget(self, request_ids: list[str]) -> None:
        """Drop the state of requests that end without a finished output (aborted)."""
        for request_id in request_ids:
            self._sent.pop(request_id, None)


class OutputDecoder:
    """Front-end side: rebuilds whole RequestOutputs from OutputEncoder's deltas; `text` is the
    text streamed so far (all of it once finished). Each decoded output is a snapshot of its own:
    a consumer may read it after later steps have arrived."""

    def __init__(self) -> None:
        self._requests: dict[str, RequestOutput] = {}

    def decode(self, fields: list[Any]) -> RequestOutput:
        request_id, prompt, completions, finished, metrics, num_cached = fields
        state = self._requests.get(request_id)
        if state is None:
            text, token_ids, prompt_logprobs = prompt
            state = RequestOutput(request_id, text, token_ids, _decode_positions(prompt_logprobs), [], False)
            self._requests[request_id] = state
        for index, new_ids, cumulative, new_logprobs, finish_reason, stop_reason, delta in completions:
            while len(state.outputs) <= index:
                state.outputs.append(CompletionOutput(len(state.outputs), "", [], None, None))
            c = state.outputs[index]
            c.token_ids.extend(new_ids)
            if new_logprobs is not None:
                c.logprobs = (c.logprobs or []) + _decode_positions(new_logprobs)
            c.text += delta
            c.text_delta, c.cumulative_logprob = delta, cumulative
            c.finish_reason, c.stop_reason = finish_reason, stop_reason
        if finished:
            del self._requests[request_id]
        return RequestOutput(
            request_id=request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs, outputs=[_snapshot(c) for c in state.outputs],
            finished=finished, metrics=RequestMetrics(*metrics), num_cached_tokens=num_cached,
        )

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._requests.pop(request_id, None)


def _encode_positions(positions: list[PositionLogprobs | None] | None) -> list[Any] | None:
    if positions is None:
        return None
    return [
        None if p is None else {token: [lp.logprob, lp.rank, lp.decoded_token] for token, lp in p.items()}
        for p in positions
    ]


def _decode_positions(positions: list[Any] | None) -> list[Any] | None:
    if positions is None:
        return None
    return [None if p is None else {token: Logprob(*lp) for token, lp in p.items()} for p in positions]


def _snapshot(c: CompletionOutput) -> CompletionOutput:
    return dataclasses.replace(
        c, token_ids=list(c.token_ids), logprobs=None if c.logprobs is None else list(c.logprobs)
    )
