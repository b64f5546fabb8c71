"""AsyncLLM: the engine core in its own process (core_proc.py), its outputs delivered to asyncio.

The event loop never blocks on the engine: its commands (add, abort) go into a thread-safe queue
that a sender thread forwards over ZeroMQ, and a receiver thread turns the core's token ids into
RequestOutputs (the OutputProcessor: detokenization, stop strings, n>1 gathering; it alone
touches the processor) and hands each to its request's asyncio.Queue. Model execution runs in the
core process, so it never holds this process's GIL. Tokenization stays here, in the front end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import queue
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from pagoda.config import EngineConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine import serial
from pagoda.engine.core_proc import run_engine_core
from pagoda.engine.output_processor import EngineRequest, OutputProcessor, fan_out
from pagoda.loader.model_loader import load_tokenizer
from pagoda.loader.model_resolver import resolve_model
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda")

_POLL_MS = 500  # how often the receiver checks that the core process is alive


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
        self._dir = tempfile.TemporaryDirectory(prefix="pagoda-")
        input_address, output_address = (f"ipc://{Path(self._dir.name) / name}" for name in ("in", "out"))
        self._context = zmq.Context()
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.bind(input_address)
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.bind(output_address)
        # spawn, not fork: a forked child would inherit this process's threads and torch state.
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, name="pagoda-engine-core", daemon=True,
            args=(config, input_address, output_address, logging.getLogger().getEffectiveLevel()),
        )
        self._process.start()
        self.max_model_len, self.vocab_size, self.model_name = self._wait_ready()
        resolved = resolve_model(config.model, config.load_format)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(resolved, config.tokenizer)
        self.stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
        self.counters = EngineCounters()
        self.finished_listeners: list[FinishedListener] = []
        self._processor = OutputProcessor(self.tokenizer)  # the receiver thread's only
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[str, _Pending] = {}
        self._sender = threading.Thread(target=self._send_loop, name="pagoda-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="pagoda-engine-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    def _wait_ready(self) -> tuple[int, int, str]:
        while not self._from_core.poll(_POLL_MS):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core process exited with {self._process.exitcode} while starting")
        message = serial.unpack(self._from_core.recv())
        if message[0] == "failed":
            self._process.join(10)
            raise ValueError(message[1])
        _, max_model_len, vocab_size, model_name = message
        return max_model_len, vocab_size, model_name

    def is_alive(self) -> bool:
        return self._process.is_alive()

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
        self._commands.put(["add", request_id, list(prompt_token_ids), encoded])
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._streams.pop(request_id, None)
            self._pending.pop(request_id, None)
            self._commands.put(["abort", stream.engine_request_ids])  # in case the engine took it
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
                self._commands.put(["abort", stream.engine_request_ids])

    def abort(self, request_ids: list[str] | None = None) -> None:
        """Abort these requests (None: all of them) and free their KV blocks; thread-safe and
        safe in a signal handler. Requests already ended are ignored."""
        if request_ids is None:
            self._commands.put(["abort", None])
            return
        streams = [self._streams.get(request_id) for request_id in request_ids]
        engine_ids = [i for stream in streams if stream is not None for i in stream.engine_request_ids]
        if engine_ids:
            self._commands.put(["abort", engine_ids])

    def shutdown(self, timeout: float = 5.0) -> None:
        self.abort()
        self._commands.put(["stop"])
        self._sender.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        self._receiver.join(timeout)  # it stops once the core has; only then may the sockets close
        self._context.destroy(linger=0)
        self._dir.cleanup()

    # The I/O threads -------------------------------------------------------------------------

    def _send_loop(self) -> None:
        # Only this thread touches the sending socket: ZeroMQ sockets are not thread-safe.
        while True:
            command = self._commands.get()
            self._to_core.send(serial.pack(command))
            if command[0] == "stop":
                return

    def _receive_loop(self) -> None:
        while self._process.is_alive():
            if self._from_core.poll(_POLL_MS):
                self._handle(serial.unpack(self._from_core.recv()))
        if self._process.exitcode != 0:
            logger.error("the engine core process exited with %s", self._process.exitcode)
        error = RequestAborted("the engine core process has exited")
        for request_id in list(self._streams):
            self._deliver(request_id, error, final=True)
        for pending in list(self._pending.values()):
            if pending.accepted.set_running_or_notify_cancel():
                pending.accepted.set_exception(error)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind in ("accepted", "refused"):
            self._answer(message)
            return
        self.stats = serial.decode_stats(message[2])
        if kind == "aborted":
            for output in self._processor.abort(message[1]):
                self._finish(output, RequestAborted(f"request {output.request_id} was aborted"))
            return
        core_outputs = serial.decode_outputs(message[1])
        self.counters.generation_tokens += sum(len(o.new_token_ids) for o in core_outputs)
        outputs, stopped = self._processor.process(core_outputs)
        if stopped:  # a stop string ended them here: the core must stop them too
            self._commands.put(["abort", stopped])
        for output in outputs:
            if output.finished:
                self._finish(output, output)
            else:
                self._deliver(output.request_id, output)

    def _answer(self, message: list[Any]) -> None:
        kind, request_id = message[0], message[1]
        pending = self._pending.pop(request_id, None)
        if pending is None or not pending.accepted.set_running_or_notify_cancel():
            return  # the caller has gone: it aborts the request itself
        if kind == "refused":
            pending.accepted.set_exception(ValueError(message[2]))
            return
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
