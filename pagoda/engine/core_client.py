"""How a front end talks to its engine core: one interface, two clients.

`InprocClient` runs the core in this process (the offline `LLM`): a call is a method call, the
structs are never encoded, and `get_output` runs one step. `MPClient` drives the core processes
of a CoreGroup over ZeroMQ (the server's AsyncLLM): a request is encoded by its caller (one that
cannot be encoded fails there, alone) and sent by a sender thread; the core answers each one with
Accepted or Refused, and `get_outputs` returns the cores' messages, all that have queued, to the
front end's receiver thread."""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from pagoda.config.groups import ResolvedConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.core_group import CoreGroup
from pagoda.engine.messages import (
    Aborted,
    AbortRequests,
    Accepted,
    EngineCoreRequest,
    FromCore,
    Outputs,
    Refused,
    Stop,
    encode,
)

if TYPE_CHECKING:
    from pagoda.spec.proposer import TokenProposer

logger = logging.getLogger("pagoda")


class EngineCoreClient(ABC):
    max_model_len: int
    model_name: str

    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request (ValueError: refused, or it cannot be sent)."""

    @abstractmethod
    def abort_requests(self, request_ids: list[str] | None) -> None:
        """Stop these engine requests (None: all); ids the core no longer has are ignored."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the core; the client cannot be used after this."""


class InprocClient(EngineCoreClient):
    """The core in this process. add_request raises the core's refusal (ValueError) at once;
    get_output runs one step and returns its Outputs (no stats: nobody reads them per step)."""

    def __init__(self, config: ResolvedConfig, proposer: TokenProposer | None = None) -> None:
        from pagoda.engine.core import EngineCore  # the engine in this process (MPClient's front end has no torch)

        self.engine_core = EngineCore(config, proposer)
        self.max_model_len, self.model_name = self.engine_core.max_model_len, self.engine_core.model_name

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str] | None) -> None:
        self.engine_core.abort_requests(request_ids)

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefix blocks; False while requests hold blocks."""
        return self.engine_core.reset_prefix_cache()

    def get_output(self) -> Outputs:
        outputs = self.engine_core.step()
        return Outputs(outputs, None, self.engine_core.num_batched_tokens)

    def shutdown(self) -> None:
        self.engine_core.shutdown()


# Called in the sender thread: a request that could not be sent (never reached a core), and the
# sender thread's own end by an error (the engine can take no more commands).
UnsentListener = Callable[[str, Exception], None]
SenderDeathListener = Callable[[str], None]


class MPClient(EngineCoreClient):
    """The core processes of a CoreGroup (one, or data_parallel_size), started and ready once
    built. Any thread may add and abort; get_outputs belongs to one receiver thread."""

    def __init__(
        self, config: ResolvedConfig, on_unsent: UnsentListener, on_sender_death: SenderDeathListener,
    ) -> None:
        self.cores = CoreGroup(config)
        try:
            self.cores.wait_ready()
        except BaseException:
            self.cores.kill()
            raise
        self.max_model_len, self.model_name = self.cores.max_model_len, self.cores.model_name
        self.num_gpu_blocks = self.cores.num_gpu_blocks  # each core's
        self._on_unsent, self._on_sender_death = on_unsent, on_sender_death
        # (core index, or None for all of them; encoded message; the request id of a request)
        self._commands: queue.SimpleQueue[tuple[int | None, bytes, str | None]] = queue.SimpleQueue()
        # Requests sent and not yet answered: their core and engine request count, so that a
        # refused or unsent one stops counting as outstanding there.
        self._unanswered: dict[str, tuple[int, int]] = {}
        self._arrived_stats: dict[int, SchedulerStats] = {}  # by core, until publish_stats
        self._sender = threading.Thread(target=self._send_loop, name="pagoda-engine-send", daemon=True)
        self._sender.start()

    @property
    def stats(self) -> SchedulerStats:
        return self.cores.stats

    def alive(self) -> bool:
        return self.cores.alive()

    # Commands (any thread) --------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        try:
            data = encode(request)
        except (OverflowError, TypeError, ValueError) as error:  # e.g. an integer wider than 64 bits
            raise ValueError(f"the request cannot be sent to the engine: {type(error).__name__}: {error}") from None
        index = self.cores.pick(len(request.children))
        self._unanswered[request.request_id] = (index, len(request.children))
        self._commands.put((index, data, request.request_id))

    def abort_requests(self, request_ids: list[str] | None) -> None:
        # To every core (each ignores ids it does not have): no map of where each engine request
        # runs needs keeping. Safe in a signal handler: a queue put.
        self._commands.put((None, encode(AbortRequests(request_ids)), None))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Tell the cores to stop and wait for them (kill what lingers). The receiver stops once
        the cores have; then close()."""
        self._commands.put((None, _STOP, None))
        self._sender.join(timeout)
        self.cores.shutdown(timeout)

    def kill(self) -> None:
        """Stop the cores at once (the engine has died: they may never hear "stop")."""
        self.cores.kill()

    def close(self) -> None:
        """Once the receiver has stopped: the sockets."""
        self.cores.close()

    # The receiver thread ----------------------------------------------------------------------

    def get_outputs(self) -> list[FromCore]:
        """Every message the cores have queued (waiting a poll interval for one), in order, their
        bookkeeping done; empty when none came or a core process has ended (alive() says)."""
        return [self._count(index, message) for index, message in self.cores.receive()]

    def publish_stats(self) -> None:
        """Once the receiver has applied what get_outputs returned: the cores' latest scheduler
        stats become `stats`. Not before, so that `stats` never shows a request ended whose
        tokens are not yet counted (a /metrics scrape between the two would)."""
        for index, stats in self._arrived_stats.items():
            self.cores.cores[index].stats = stats
        self._arrived_stats.clear()

    def _count(self, index: int, message: FromCore) -> FromCore:
        """Engine requests that end stop counting against their core (routing, num_waiting)."""
        if isinstance(message, (Outputs, Aborted)):
            self._arrived_stats[index] = message.stats
        if isinstance(message, Outputs):
            self.cores.ended(index, sum(o.finish_reason is not None for o in message.outputs))
        elif isinstance(message, Aborted):
            self.cores.ended(index, len(message.request_ids))
        elif isinstance(message, (Accepted, Refused)):
            entry = self._unanswered.pop(message.request_id, None)
            if isinstance(message, Refused) and entry is not None:
                self.cores.ended(*entry)
        return message

    # The sender thread (ZeroMQ sockets are not thread-safe: one thread sends) ---------------

    def _send_loop(self) -> None:
        try:
            while True:
                index, data, request_id = self._commands.get()
                self._send(index, data, request_id)
                if data is _STOP:
                    return
        except BaseException:
            logger.exception("the engine's sender thread failed")
            self._on_sender_death("the engine's sender thread failed")

    def _send(self, index: int | None, data: bytes, request_id: str | None) -> None:
        try:
            self.cores.send(index, data)
        except Exception as error:  # one message that cannot go fails its request, not the sender
            logger.exception("sending a message to the engine failed")
            if request_id is not None:
                entry = self._unanswered.pop(request_id, None)
                if entry is not None:
                    self.cores.ended(*entry)
                self._on_unsent(request_id, error)


_STOP = encode(Stop())  # the sender's last message (compared by identity)
