"""The responses a server keeps (`store`), for previous_response_id and GET /v1/responses/{id}: in
memory, at most --max-stored-responses of them (the oldest go first) and each for at most
--stored-response-ttl seconds, so that storing never grows without bound."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import ChatMessage
from .protocol_responses import ResponseObject


@dataclass
class StoredResponse:
    response: ResponseObject
    # The conversation it answered (its instructions left out: they do not carry over) and its reply.
    messages: list[ChatMessage]
    expires_at: float


class ResponseStore:
    def __init__(self, max_count: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_count, self.ttl, self.clock = max_count, ttl, clock
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()  # oldest first

    @property
    def enabled(self) -> bool:
        return self.max_count > 0 and self.ttl > 0

    def put(self, response: ResponseObject, messages: list[ChatMessage]) -> None:
        if not self.enabled:
            return
        self._responses[response.id] = StoredResponse(response, messages, self.clock() + self.ttl)
        self._evict()

    def get(self, response_id: str) -> StoredResponse | None:
        self._evict()
        return self._responses.get(response_id)

    def __len__(self) -> int:
        return len(self._responses)

    def _evict(self) -> None:
        # Every entry lives as long, so the oldest expire first.
        now = self.clock()
        while self._responses and (
            len(self._responses) > self.max_count or next(iter(self._responses.values())).expires_at <= now
        ):
            self._responses.popitem(last=False)
