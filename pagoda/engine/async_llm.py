"""AsyncLLM: the engine core in its own process (core_proc.py; data_parallel_size of them, see
core_group.py), its outputs delivered to asyncio.

The event loop never blocks on the engine: its commands (add, abort) go into a thread-safe queue
that a sender thread forwards over ZeroMQ, and a receiver thread turns the cores' token ids into
RequestOutputs (the OutputProcessor: detokenization, stop strings, n>1 gathering; it alone
touches the processor) and hands each to its request's asyncio.Queue. Model execution runs in the
core processes, so it never holds this process's GIL. Tokenization stays here, in the front end."""

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
        self._processor = OutputProcessor(self.tokenizer)  # the receiver thread's only
        # (core index, or None for all of them; message)
        self._commands: queue.SimpleQueue[tuple[int | None, list[Any]]] = queue.SimpleQueue()
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
        return self._cores.alive()

    # The event loop's side ------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; once the engine accepts it, returns its outputs step by step (the last
        one finished). Raises the engine's ValueError for a request it refuses. Leaving the
        iteration early (a client gone) aborts the request; so must a caller that never starts it."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = fan_out(request_id, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), [child_id for child_id, _ in children])
        self._streams[request_id] = stream
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._pending[request_id] = _Pending(accepted, prompt, list(prompt_token_ids), children, time.time())
        encoded = [[child_id, serial.encode_params(p)] for child_id, p in children]
        self._commands.put((self._cores.pick(len(children)), ["add", request_id, list(prompt_token_ids), encoded]))
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._streams.pop(request_id, None)
            self._commands.put((None, ["abort", stream.engine_request_ids]))  # in case the engine took it
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
                self._commands.put((None, ["abort", stream.engine_request_ids]))

    def abort(self, request_ids: list[str] | None = None) -> None:
        """Abort these requests (None: all of them) and free their KV blocks; thread-safe and
        safe in a signal handler. Requests already ended are ignored."""
        if request_ids is None:
            self._commands.put((None, ["abort", None]))
            return
        streams = [self._streams.get(request_id) for request_id in request_ids]
        engine_ids = [i for stream in streams if stream is not None for i in stream.engine_request_ids]
        if engine_ids:
            self._commands.put((None, ["abort", engine_ids]))

    def shutdown(self, timeout: float = 5.0) -> None:
        self.abort()
        self._commands.put((None, ["stop"]))
        self._sender.join(timeout)
        self._cores.shutdown(timeout)
        self._receiver.join(timeout)  # it stops once the cores have; only then may the sockets close
        self._cores.close()

    # The I/O threads -------------------------------------------------------------------------

    def _send_loop(self) -> None:
        # Aborts go to every core (each ignores ids it does not have): no map of where each
        # engine request runs needs keeping.
        while True:
            index, command = self._commands.get()
            self._cores.send(index, command)
            if command[0] == "stop":
                return

    def _receive_loop(self) -> None:
        for index, message in self._cores.receive():
            self._handle(index, message)
        error = RequestAborted("the engine core process has exited")
        for request_id in list(self._streams):
            self._deliver(request_id, error, final=True)
        for pending in list(self._pending.values()):
            if pending.accepted.set_running_or_notify_cancel():
                pending.accepted.set_exception(error)

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
            self._commands.put((None, ["abort", stopped]))
        for output in outputs:
            if output.finished:
                self._finish(output, output)
            else:
                self._deliver(output.request_id, output)

    def _answer(self, index: int, message: list[Any]) -> None:
        kind, request_id = message[0], message[1]
        pending = self._pending.pop(request_id)
        if kind == "refused":
            self._cores.ended(index, len(pending.children))
            if pending.accepted.set_running_or_notify_cancel():
                pending.accepted.set_exception(ValueError(message[2]))
            return
        if not pending.accepted.set_running_or_notify_cancel():
            return  # the caller has gone: it aborts the request itself
        self._processor.add(
            request_id, pending.prompt, pending.prompt_token_ids, pending.children, pending.arrival_time
        )
        self.counters.prompt_tokens += len(pending.prompt_token_ids)
        pending.accepted.set_result(None)

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
