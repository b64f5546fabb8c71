"""AsyncLLM: the engine core in its own process (core_proc.py), its outputs delivered to asyncio.

The event loop never blocks on the engine: its commands (add, abort) go into a thread-safe queue
that a sender thread forwards over ZeroMQ, and a receiver thread hands each request's outputs to
that request's asyncio.Queue. Model execution runs in the core process, so it never holds this
process's GIL. Tokenization stays here, in the front end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import queue
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from pagoda.config import EngineConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine import serial
from pagoda.engine.core_proc import run_engine_core
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
    """Totals since start, for /metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0


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
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._decoder = serial.OutputDecoder()  # used by the receiver thread only
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
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._pending[request_id] = accepted
        self._commands.put(["add", request_id, list(prompt_token_ids), serial.encode_params(params), prompt])
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._streams.pop(request_id, None)
            self._pending.pop(request_id, None)
            self.abort([request_id])  # in case it was cancelled after the engine took it
            raise
        return self._outputs(request_id, outputs)

    async def _outputs(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort([request_id])

    def abort(self, request_ids: list[str] | None = None) -> None:
        """Abort these requests (None: all of them) and free their KV blocks; thread-safe and
        safe in a signal handler."""
        self._commands.put(["abort", request_ids])

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
            self._deliver(request_id, error)
        for future in list(self._pending.values()):
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind in ("accepted", "refused"):
            future = self._pending.pop(message[1], None)
            if future is not None and future.set_running_or_notify_cancel():
                if kind == "accepted":
                    future.set_result(None)
                else:
                    future.set_exception(ValueError(message[2]))
            return
        *_, stats, counters = message
        self.stats, self.counters = serial.decode_stats(stats), EngineCounters(*counters)
        if kind == "aborted":
            self._decoder.forget(message[1])
            for request_id in message[1]:
                self._deliver(request_id, RequestAborted(f"request {request_id} was aborted"))
        else:
            for fields in message[1]:
                output = self._decoder.decode(fields)
                self._deliver(output.request_id, output)

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass
