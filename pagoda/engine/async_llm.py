"""AsyncLLM: the engine core in its own process (core_proc.py; data_parallel_size of them, see
core_group.py), its outputs delivered to asyncio.

The event loop never blocks on the engine: its commands (add, abort), encoded by their caller (so
a request that cannot be encoded fails there, alone), go into a thread-safe queue that a sender
thread forwards over ZeroMQ, and a receiver thread turns the cores' token ids into RequestOutputs
(the OutputProcessor: detokenization, stop strings, n>1 gathering; it alone touches the processor)
and hands each to its request's asyncio.Queue. Model execution runs in the core processes, so it
never holds this process's GIL. Tokenization stays here, in the front end.

The engine dies when a core process, the sender or the receiver ends other than by shutdown():
then every request in flight fails with EngineDeadError, every new one is refused with it at once,
is_alive() turns False and the dead_listeners hear of it (the server exits)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pagoda.config import EngineConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine import serial
from pagoda.engine.core_group import CoreGroup
from pagoda.engine.output_processor import EngineRequest, OutputProcessor, fan_out
from pagoda.loader.model_loader import load_tokenizer
from pagoda.loader.model_resolver import resolve_model
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda")

class RequestAborted(Exception):
    """The engine stopped the request before it finished (shutdown or an engine failure)."""


class EngineDeadError(RequestAborted):
    """The engine no longer runs (it died, or was shut down): no request can be served."""


@dataclass
class EngineCounters:
    """Totals since start, for /metrics and the stats log line."""

    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    engine_request_ids: list[str]


@dataclass
class _Pending:
    """A request sent to the core, registered with the OutputProcessor once the core accepts it."""

    accepted: concurrent.futures.Future
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[EngineRequest]
    arrival_time: float


# Called in the receiver thread with the final output of each request that ends (finished or
# aborted): the server's metrics.
FinishedListener = Callable[[RequestOutput], None]
# Called once, in the I/O thread that found it, when the engine dies: the server exits.
DeadListener = Callable[[EngineDeadError], None]

_STOP = serial.pack(["stop"])  # the sender's last message (compared by identity)


class AsyncLLM:
    def __init__(self, config: EngineConfig) -> None:
        self._cores = CoreGroup(config)
        try:  # the tokenizer loads here while the cores build their engines
            resolved = resolve_model(config.model, config.load_format)
            self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(resolved, config.tokenizer)
            self._cores.wait_ready()
        except BaseException:
            self._cores.kill()
            raise
        self.max_model_len, self.vocab_size = self._cores.max_model_len, self._cores.vocab_size
        self.model_name = self._cores.model_name
        self.counters = EngineCounters()
        self.finished_listeners: list[FinishedListener] = []
        self.dead_listeners: list[DeadListener] = []
        self._processor = OutputProcessor(self.tokenizer)  # the receiver thread's only
        # (core index, or None for all of them; packed message; the request id of an "add")
        self._commands: queue.SimpleQueue[tuple[int | None, bytes, str | None]] = queue.SimpleQueue()
        # The lock orders adding a request against the engine's end: a request is either refused
        # or failed by _end_all, never left waiting.
        self._lock = threading.Lock()
        self._dead: str | None = None  # why the engine no longer runs
        self._stopping = False  # shutdown() has begun: the cores' exit is expected
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[str, _Pending] = {}
        self._sender = threading.Thread(target=self._send_loop, name="pagoda-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="pagoda-engine-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def stats(self) -> SchedulerStats:
        """The latest scheduler stats, summed over the engine cores."""
        return self._cores.stats

    @property
    def requests_per_core(self) -> list[int]:
        """Engine requests sent to each engine core since start."""
        return [core.routed for core in self._cores.cores]

    @property
    def num_waiting(self) -> int:
        """Engine requests not yet running, up to date with every add (unlike stats.num_waiting,
        which is as of the cores' last step): what --max-queued-requests bounds."""
        return self._cores.num_waiting

    def is_alive(self) -> bool:
        return self._dead is None and self._cores.alive()

    # The event loop's side ------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; once the engine accepts it, returns its outputs step by step (the last
        one finished). Raises ValueError for a request the engine refuses or that cannot be
        encoded, EngineDeadError at once once the engine has died. Leaving the iteration early (a
        client gone) aborts the request; so must a caller that never starts it."""
        children = fan_out(request_id, params)
        encoded = [[child_id, serial.encode_params(p)] for child_id, p in children]
        data = _pack_request(["add", request_id, list(prompt_token_ids), encoded])
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), [child_id for child_id, _ in children])
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None:
                raise self._dead_error()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._pending[request_id] = _Pending(accepted, prompt, list(prompt_token_ids), children, time.time())
        self._commands.put((self._cores.pick(len(children)), data, request_id))
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._streams.pop(request_id, None)
            self._send_abort(stream.engine_request_ids)  # in case the engine took it
            raise
        return self._outputs(stream)

    async def _outputs(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._send_abort(stream.engine_request_ids)

    def abort(self, request_ids: list[str] | None = None) -> None:
        """Abort these requests (None: all of them) and free their KV blocks; thread-safe and
        safe in a signal handler. Requests already ended are ignored."""
        if request_ids is None:
            self._send_abort(None)
            return
        streams = [self._streams.get(request_id) for request_id in request_ids]
        engine_ids = [i for stream in streams if stream is not None for i in stream.engine_request_ids]
        if engine_ids:
            self._send_abort(engine_ids)

    def _send_abort(self, engine_request_ids: list[str] | None) -> None:
        # Aborts go to every core (each ignores ids it does not have): no map of where each
        # engine request runs needs keeping.
        self._commands.put((None, serial.pack(["abort", engine_request_ids]), None))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.abort()
        self._commands.put((None, _STOP, None))
        self._sender.join(timeout)
        if self._dead is not None:  # nothing to wait for: what still runs may never hear "stop"
            self._cores.kill()
        self._cores.shutdown(timeout)
        self._receiver.join(timeout)  # it stops once the cores have; only then may the sockets close
        self._cores.close()

    # The I/O threads -------------------------------------------------------------------------

    def _send_loop(self) -> None:
        try:
            while True:
                index, data, request_id = self._commands.get()
                self._send(index, data, request_id)
                if data is _STOP:
                    return
        except BaseException:
            logger.exception("the engine's sender thread failed")
            self._mark_dead("the engine's sender thread failed")

    def _send(self, index: int | None, data: bytes, request_id: str | None) -> None:
        try:
            self._cores.send(index, data)
        except Exception as error:  # one message that cannot go fails its request, not the sender
            logger.exception("sending a message to the engine failed")
            if request_id is not None:
                self._refuse(index, request_id, RequestAborted(f"request {request_id} could not be sent: {error}"))

    def _receive_loop(self) -> None:
        try:
            for index, message in self._cores.receive(lambda: self._dead is None):
                self._handle(index, message)
            if not self._stopping:
                self._mark_dead(self._cores.exits() or "the engine's receive loop ended")
        except BaseException:
            logger.exception("the engine's receiver thread failed")
            self._mark_dead("the engine's receiver thread failed")
        self._end_all()

    def _mark_dead(self, cause: str) -> None:
        """The engine has died of cause (the first one found wins): refuse every new request, and
        tell the listeners. The receiver fails the requests in flight (_end_all)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = cause
        logger.error("the engine has died: %s", cause)
        error = self._dead_error()
        for listener in self.dead_listeners:
            try:
                listener(error)
            except Exception:
                logger.exception("an engine-death listener failed")

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine no longer runs: {self._dead}")

    def _end_all(self) -> None:
        """The receiver's last act: every request still here fails, and so will every new one."""
        with self._lock:
            self._dead = self._dead or "the engine has shut down"
            streams, pending = list(self._streams), list(self._pending.values())
            self._pending.clear()
        error = self._dead_error()
        for request_id in streams:
            self._deliver(request_id, error, final=True)
        for waiting in pending:
            _fail(waiting, error)

    def _handle(self, index: int, message: list[Any]) -> None:
        kind = message[0]
        if kind in ("accepted", "refused"):
            self._answer(index, message)
            return
        if kind == "aborted":
            self._cores.ended(index, len(message[1]))
            for output in self._processor.abort(message[1]):
                self._finish(output, RequestAborted(f"request {output.request_id} was aborted"))
            return
        core_outputs = serial.decode_outputs(message[1])
        self._cores.ended(index, sum(o.finish_reason is not None for o in core_outputs))
        self.counters.generation_tokens += sum(len(o.new_token_ids) for o in core_outputs)
        outputs, stopped = self._processor.process(core_outputs)
        if stopped:  # a stop string ended them here: the core must stop them too
            self._send_abort(stopped)
        for output in outputs:
            if output.finished:
                self._finish(output, output)
            else:
                self._deliver(output.request_id, output)

    def _answer(self, index: int, message: list[Any]) -> None:
        kind, request_id = message[0], message[1]
        if kind == "refused":
            self._refuse(index, request_id, ValueError(message[2]))
            return
        pending = self._take_pending(request_id)
        if pending is None or not pending.accepted.set_running_or_notify_cancel():
            return  # the caller has gone: it aborts the request itself
        self._processor.add(
            request_id, pending.prompt, pending.prompt_token_ids, pending.children, pending.arrival_time
        )
        self.counters.prompt_tokens += len(pending.prompt_token_ids)
        pending.accepted.set_result(None)

    def _refuse(self, index: int, request_id: str, error: Exception) -> None:
        """A request the core will not run (refused, or never sent to it) fails with error."""
        pending = self._take_pending(request_id)
        if pending is not None:
            self._cores.ended(index, len(pending.children))
            _fail(pending, error)

    def _take_pending(self, request_id: str) -> _Pending | None:
        with self._lock:  # the sender, the receiver and _end_all each take a request once
            return self._pending.pop(request_id, None)

    def _finish(self, output: RequestOutput, item: Any) -> None:
        for listener in self.finished_listeners:
            try:
                listener(output)
            except Exception:  # metrics must never stop the delivery of outputs
                logger.exception("a finished-request listener failed")
        self._deliver(output.request_id, item, final=True)

    def _deliver(self, request_id: str, item: Any, final: bool = False) -> None:
        # The last item ends the stream here, not in its consumer: a stream nobody iterates (its
        # handler failed first) must not stay behind.
        stream = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass


def _pack_request(command: list[Any]) -> bytes:
    try:
        return serial.pack(command)
    except (OverflowError, TypeError, ValueError) as error:  # e.g. an integer wider than 64 bits
        raise ValueError(f"the request cannot be sent to the engine: {type(error).__name__}: {error}") from None


def _fail(pending: _Pending, error: Exception) -> None:
    if pending.accepted.set_running_or_notify_cancel():  # False: its caller has gone
        pending.accepted.set_exception(error)
