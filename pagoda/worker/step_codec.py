"""A step's SchedulerOutput as worker processes receive it: only what changed since the last step.

Pickling whole requests every step costs milliseconds at a batch of hundreds (their token lists
grow with every token), as much as a decode step on a GPU. Instead each worker keeps a mirror of
every unfinished request; a step message carries the requests the workers have not seen, the
tokens appended to those they have, the ids of those that finished, and for each chunk only its
place (request id, start, length, block table, whether it samples, its draft tokens), and the
step's grammar masks (structured outputs)."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.core.request import Request
from pagoda.core.scheduler import ScheduledChunk, SchedulerOutput
from pagoda.structured_output.bitmask import GrammarBitmask


@dataclass
class StepMessage:
    new_requests: list[Request]
    appended: list[tuple[str, list[int]]]  # request id -> output tokens the workers lack
    finished: list[str]  # mirrors to drop
    # request id, start, num_tokens, block_ids, samples, draft_token_ids
    chunks: list[tuple[str, int, int, list[int], bool, list[int]]]
    num_batched_tokens: int
    grammar_bitmask: GrammarBitmask | None = None


class StepEncoder:
    """The engine's side: remembers how many tokens of each request the workers hold."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[Request, int]] = {}

    def encode(self, scheduler_output: SchedulerOutput) -> StepMessage:
        finished = [rid for rid, (req, _) in self._sent.items() if req.status.is_finished()]
        for rid in finished:
            del self._sent[rid]
        message = StepMessage(
            [], [], finished, [], scheduler_output.num_batched_tokens, scheduler_output.grammar_bitmask
        )
        for chunk in scheduler_output.chunks:
            req = chunk.request
            sent = self._sent.get(req.request_id)
            if sent is None or sent[0] is not req:  # new, or an id reused after its request ended
                message.new_requests.append(req)
            elif sent[1] < req.num_tokens:
                message.appended.append((req.request_id, req.token_ids[sent[1] :]))
            self._sent[req.request_id] = (req, req.num_tokens)
            message.chunks.append(
                (req.request_id, chunk.start, chunk.num_tokens, chunk.block_ids, chunk.samples, chunk.draft_token_ids)
            )
        return message


class StepDecoder:
    """A worker's side: the mirrors, brought up to date, and the SchedulerOutput over them."""

    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}

    def decode(self, message: StepMessage) -> SchedulerOutput:
        for rid in message.finished:
            self._requests.pop(rid, None)
        for req in message.new_requests:
            self._requests[req.request_id] = req
        for rid, tokens in message.appended:
            req = self._requests[rid]
            for token in tokens:
                req.append_output_token(token)
        chunks = [
            ScheduledChunk(self._requests[rid], start, num_tokens, block_ids, samples, drafts)
            for rid, start, num_tokens, block_ids, samples, drafts in message.chunks
        ]
        return SchedulerOutput(chunks, message.num_batched_tokens, grammar_bitmask=message.grammar_bitmask)
