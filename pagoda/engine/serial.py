"""msgpack encoding of what crosses the engine-core process boundary: SamplingParams in,
CoreOutputs (new token ids and raw logprobs, no text) and SchedulerStats out. Dataclasses travel
as lists of their fields, in order."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.output_processor import CoreOutput
from pagoda.sample.sampler import TopLogprobs
from pagoda.sampling_params import SamplingParams


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # logit_bias is keyed by token id: int keys must be allowed.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_params(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def decode_params(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)


def encode_stats(stats: SchedulerStats) -> list[Any]:
    return list(dataclasses.astuple(stats))


def decode_stats(fields: list[Any]) -> SchedulerStats:
    return SchedulerStats(*fields)


def encode_outputs(outputs: list[CoreOutput]) -> list[Any]:
    return [
        [o.request_id, o.new_token_ids, _encode_tops(o.new_logprobs),
         None if o.prompt_logprobs is None else [o.prompt_logprobs[0], _encode_tops(o.prompt_logprobs[1])],
         o.finish_reason, o.stop_reason, o.num_cached_tokens, o.first_scheduled_time]
        for o in outputs
    ]


def decode_outputs(fields: list[Any]) -> list[CoreOutput]:
    outputs = []
    for rid, new_ids, new_logprobs, prompt_logprobs, finish, stop, cached, scheduled in fields:
        prompt = None if prompt_logprobs is None else (prompt_logprobs[0], _decode_tops(prompt_logprobs[1]))
        outputs.append(CoreOutput(rid, new_ids, _decode_tops(new_logprobs), prompt, finish, stop, cached, scheduled))
    return outputs


def _encode_tops(tops: list[TopLogprobs] | None) -> list[Any] | None:
    return None if tops is None else [dataclasses.astuple(t) for t in tops]


def _decode_tops(fields: list[Any] | None) -> list[TopLogprobs] | None:
    return None if fields is None else [TopLogprobs(*t) for t in fields]
