"""What crosses the engine core's boundary, as typed structs with one codec (msgspec's msgpack).

Front end -> core: EngineCoreRequest (one user request: its prompt ids, its images' inputs and
its engine requests, n>1 already fanned out), AbortRequests, Stop. Core -> front end: Ready or Failed once at start-up,
then Accepted / Refused per EngineCoreRequest, Aborted and Outputs (each with the core's scheduler
stats; Outputs stamped with the time the core made them). Every struct is tagged, so one decoder
per direction returns the right type; token ids, never text, cross the boundary. The in-process
core takes and returns the same structs, unencoded.

Encoding raises OverflowError for an integer wider than 64 bits (a seed, a token id), TypeError
for a value msgpack cannot hold: the caller fails that one request."""

from __future__ import annotations

import time

import msgspec

from pagoda.core.scheduler import SchedulerStats
from pagoda.lora.request import LoRARequest
from pagoda.multimodal.inputs import ImageInput
from pagoda.sample.top_logprobs import TopLogprobs
from pagoda.sampling_params import SamplingParams, rebuilding_checked_params

# An engine request: its id and its own SamplingParams (n=1).
EngineRequest = tuple[str, SamplingParams]


class _Message(msgspec.Struct, array_like=True, tag=True):
    """Tagged by class name; fields travel as an array (no field names on the wire)."""


# Front end -> core ---------------------------------------------------------------------------------


class EngineCoreRequest(_Message):
    """One user request, queued all or none: its engine requests share the prompt."""

    request_id: str
    prompt_token_ids: list[int]
    children: list[EngineRequest]
    lora_request: LoRARequest | None = None  # the adapter every child runs with; None: the base model
    images: list[ImageInput] = []  # the prompt's images, in prompt order (multimodal/inputs.py)
    cache_salt: str | None = None  # vLLM's: the prompt's cached blocks shared only with requests of the same salt
    priority: int = 0  # vLLM's: with --scheduling-policy priority, lower runs earlier
    # The first token of type 1 (vLLM's compressed token_type_ids: a text pair's second text); None: all type 0.
    pair_start: int | None = None


class AbortRequests(_Message):
    request_ids: list[str] | None  # None: every request


class Stop(_Message):
    pass


# Core -> front end ---------------------------------------------------------------------------------


class CoreOutput(msgspec.Struct, array_like=True, gc=False):
    """What the engine core reports about one engine request after a step."""

    request_id: str
    new_token_ids: list[int]
    # One TopLogprobs per new token (the chosen token first), when the request asked for logprobs.
    new_logprobs: list[TopLogprobs] | None = None
    # Prompt positions scored this step: (index of the first, their logprobs), when asked for.
    prompt_logprobs: tuple[int, list[TopLogprobs]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    # An embedding engine's: the prompt's pooled hidden state (float32), sent once, as it finishes.
    pooled: list[float] | None = None


class Ready(_Message):
    max_model_len: int
    model_name: str
    num_gpu_blocks: int  # the KV cache's blocks (what fit, or num_gpu_blocks_override)


class Failed(_Message):
    """The core could not start: why."""

    message: str


class Accepted(_Message):
    request_id: str


class Refused(_Message):
    """The core will not run the request (a ValueError: its message)."""

    request_id: str
    message: str


class Aborted(_Message):
    request_ids: list[str]  # those that were unfinished
    stats: SchedulerStats


class Outputs(_Message):
    outputs: list[CoreOutput]
    stats: SchedulerStats | None  # None in-process, where nobody reads them per step
    num_batched_tokens: int = 0  # tokens the step that made these outputs computed (0: no step)
    # When the core made them (time.time(), comparable with the front end's arrival times on the
    # same host): request timings are taken from it, since a front end that fell behind the core
    # applies several steps at one moment of its own.
    timestamp: float = msgspec.field(default_factory=time.time)


ToCore = EngineCoreRequest | AbortRequests | Stop
FromCore = Ready | Failed | Accepted | Refused | Aborted | Outputs

encode = msgspec.msgpack.Encoder().encode
_decode_to_core = msgspec.msgpack.Decoder(ToCore).decode


def decode_to_core(data: bytes) -> ToCore:
    # The front end checked every SamplingParams when it made them: the core does not again.
    with rebuilding_checked_params():
        return _decode_to_core(data)


decode_from_core = msgspec.msgpack.Decoder(FromCore).decode
