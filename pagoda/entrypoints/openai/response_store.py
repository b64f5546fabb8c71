"""The responses a server keeps (`store`), for previous_response_id and GET /v1/responses/{id}: in
memory, at most --max-stored-responses of them (the oldest go first) and each for at most
--stored-response-ttl seconds, so that storing never grows without bound; a streamed background
response's events with it, for GET /v1/responses/{id}?stream=true."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .protocol import ChatMessage
from .protocol_responses import ResponseObject


@dataclass
class StoredResponse:
    response: ResponseObject
    # The conversation it answered (its instructions left out: they do not carry over) and its reply.
    messages: list[ChatMessage]
    expires_at: float
    events: EventLog | None = None  # a streamed background response's


class EventLog:
    """A streamed background response's events, numbered as their sequence_number: kept so that a
    client may read them (again) from any point and follow those still to come."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.ended = False
        self._grew = asyncio.Event()

    def append(self, event: str) -> None:
        self.events.append(event)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    async def follow(self, start: int = 0) -> AsyncIterator[str]:
        """The events from number `start`, until the response has ended."""
        i = start
        while True:
            grew = self._grew  # before reading: an event added meanwhile has set it
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.ended:
                return
            await grew.wait()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()


class ResponseStore:
    def __init__(self, max_count: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_count, self.ttl, self.clock = max_count, ttl, clock
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()  # oldest first

    @property
    def enabled(self) -> bool:
        return self.max_count > 0 and self.ttl > 0

    def put(self, response: ResponseObject, messages: list[ChatMessage], events: EventLog | None = None) -> None:
        """Keep the response (one stored again, as a background response is as it goes, lives on from now)."""
        if not self.enabled:
            return
        self._responses.pop(response.id, None)  # to the newest end: the oldest stay first
        self._responses[response.id] = StoredResponse(response, messages, self.clock() + self.ttl, events)
        self._evict()

    def get(self, response_id: str) -> StoredResponse | None:
        self._evict()
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forget the response; whether it was kept."""
        self._evict()
        return self._responses.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._responses)

    def _evict(self) -> None:
        # Every entry lives as long, so the oldest expire first.
        now = self.clock()
        while self._responses and (
            len(self._responses) > self.max_count or next(iter(self._responses.values())).expires_at <= now
        ):
            self._responses.popitem(last=False)
