"""A request as the scheduler sees it: token ids and progress, nothing on a device."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.lora.request import LoRARequest
    from pagoda.multimodal.inputs import ImageInput
    from pagoda.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason of a finished status; None while the request lives."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
        images: list[ImageInput] | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        pair_start: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.lora_request = lora_request
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = list(prompt_token_ids)  # prompt + output, appended in place
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.images = images or []  # in prompt order; their placeholders are prompt tokens
        self.cache_salt = cache_salt  # keys its first block, and so every block after it
        self.priority = priority  # with priority scheduling: lower runs earlier
        # A text pair's (a BERT cross-encoder's): its second text's first token, of token type 1 as
        # every token after it; None: every token is of type 0.
        self.pair_start = pair_start
        room = max_model_len - len(prompt_token_ids)
        requested = sampling_params.max_tokens
        self.max_tokens = room if requested is None else min(requested, room)
        self.num_computed_tokens = 0
        # Tokens that steps already scheduled will sample but the host has not read yet: with
        # asynchronous scheduling the next step is planned before the current one's tokens arrive.
        self.num_output_placeholders = 0
        # Proposed next tokens (a TokenProposer's), verified by the next step that computes them
        # with the last known token; and how many of a scheduled step's are still unread.
        self.draft_token_ids: list[int] = []
        self.num_drafts_in_flight = 0
        # A structured-output request is not scheduled until its grammar is compiled.
        self.waiting_for_grammar = False
        self.num_cached_tokens = 0
        self.first_scheduled_time: float | None = None  # time.time() when first admitted to the batch
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def lora_int_id(self) -> int:
        """The adapter's id; 0: the base model alone."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def use_prefix_cache(self) -> bool:
        # Prompt logprobs need the logits of every prompt position: nothing may be skipped.
        return self.sampling_params.prompt_logprobs is None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"{self.status.name})"
        )
