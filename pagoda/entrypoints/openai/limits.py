"""How much of the server one request may take: `pagoda serve`'s request limits, in one place for
the flags, the HTTP middleware and the chat handler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    # Bytes of a request body: a prompt of a 128K-token context is well under 1 MiB as text and
    # about 1 MiB as token ids, so 16 MiB leaves room for batches of prompts, while the JSON of a
    # body (parsed on the event loop) stays a fraction of a second.
    max_request_body_size: int = 16 * 2**20
    # Seconds from a request's headers to the end of its body; a client that stalls mid-body would
    # otherwise hold its connection for good.
    request_body_timeout: float = 60.0
    # Seconds a chat template may take to render; real ones take milliseconds.
    chat_template_timeout: float = 10.0
    # A request's own `chat_template` runs on the server: refused unless the operator trusts clients.
    trust_request_chat_template: bool = False
