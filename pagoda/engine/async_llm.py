"""AsyncLLM: the server's front end. Its engine core runs in its own process (core_proc.py;
data_parallel_size of them, see core_group.py), driven through the MPClient (core_client.py); its
outputs are delivered to asyncio.

The front end is the offline LLMEngine's, asynchronous: the InputProcessor (tokenizer, EOS ids,
fan-out, prompt checks) makes each EngineCoreRequest, and the OutputProcessor (detokenization,
stop strings, n>1 gathering) turns the cores' token ids into RequestOutputs. The event loop never
blocks on the engine: the client encodes a command in its caller (so a request that cannot be
encoded fails there, alone) and a sender thread forwards it over ZeroMQ; a receiver thread here
takes the cores' messages, runs the OutputProcessor (it alone touches it) and hands each output
to its request's asyncio.Queue. Model execution runs in the core processes, so it never holds
this process's GIL.

The engine dies when a core process, the sender or the receiver ends other than by shutdown():
then every request in flight fails with EngineDeadError, every new one is refused with it at once,
is_alive() turns False and the dead_listeners hear of it (the server exits)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagoda.config import EngineConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.core_client import MPClient
from pagoda.engine.input_processor import InputProcessor
from pagoda.engine.messages import (
    Aborted,
    Accepted,
    EngineRequest,
    FromCore,
    Outputs,
    Refused,
)
from pagoda.engine.output_processor import IterationStats, OutputProcessor
from pagoda.free_memory import release_free_memory
from pagoda.lora.request import LoRARequest
from pagoda.multimodal.inputs import image_tokens
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
    prompt_image_tokens: int = 0  # the prompt tokens that stand for images (counted in prompt_tokens too)
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
    num_image_tokens: int = 0


# Called in the receiver thread with the final output of each request that ends (finished or
# aborted), and with what each engine step did: the server's metrics.
FinishedListener = Callable[[RequestOutput], None]
IterationListener = Callable[[IterationStats], None]
# Called once, in the I/O thread that found it, when the engine dies: the server exits.
DeadListener = Callable[[EngineDeadError], None]


class AsyncLLM:
    def __init__(self, config: EngineConfig, server: bool = False) -> None:
        """server: `pagoda serve`'s engine (its defaults, its configuration resolved apart:
        engine/resolve_apart.py)."""
        # The lock orders adding a request against the engine's end: a request is either refused
        # or failed by _end_all, never left waiting.
        self._lock = threading.Lock()
        self._dead: str | None = None  # why the engine no longer runs
        self._stopping = False  # shutdown() has begun: the cores' exit is expected
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[str, _Pending] = {}
        self.counters = EngineCounters()
        self.finished_listeners: list[FinishedListener] = []
        self.iteration_listeners: list[IterationListener] = []
        self.dead_listeners: list[DeadListener] = []
        # The cores start with the configuration (its EOS ids taken from the tokenizer where it was
        # resolved) while the server's tokenizer, sent after it, is unpickled here.
        self.processor = InputProcessor(config, server=server)
        self.vocab_size = self.processor.vocab_size
        self.engine_core = MPClient(self.processor.config, on_unsent=self._unsent, on_sender_death=self._mark_dead)
        try:
            self.tokenizer = self.processor.tokenizer
        except BaseException:  # the cores were started for nothing
            self.engine_core.shutdown()
            self.engine_core.close()
            raise
        self._output_processor = OutputProcessor(self.tokenizer)  # the receiver thread's only
        self.max_model_len, self.model_name = self.engine_core.max_model_len, self.engine_core.model_name
        self.config, self.num_gpu_blocks = self.processor.config, self.engine_core.num_gpu_blocks
        self._receiver = threading.Thread(target=self._receive_loop, name="pagoda-engine-receive", daemon=True)
        self._receiver.start()

    @property
    def stats(self) -> SchedulerStats:
        """The latest scheduler stats, summed over the engine cores."""
        return self.engine_core.stats

    @property
    def requests_per_core(self) -> list[int]:
        """Engine requests sent to each engine core since start."""
        return [core.routed for core in self.engine_core.cores.cores]

    @property
    def num_waiting(self) -> int:
        """Engine requests not yet running, up to date with every add (unlike stats.num_waiting,
        which is as of the cores' last step): what --max-queued-requests bounds."""
        return self.engine_core.cores.num_waiting

    def is_alive(self) -> bool:
        return self._dead is None and self.engine_core.alive()

    # The event loop's side ------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
        lora_request: LoRARequest | None = None,
        images: Sequence[Any] = (),
        cache_salt: str | None = None,
        priority: int = 0,
        token_type_ids: Sequence[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; once the engine accepts it, returns its outputs step by step (the last
        one finished). Raises ValueError for a request the engine refuses or that cannot be
        encoded, EngineDeadError at once once the engine has died. Leaving the iteration early (a
        client gone) aborts the request; so must a caller that never starts it. token_type_ids: a
        BERT text pair's (an embedding engine's)."""
        make = functools.partial(
            self.processor.make_request, request_id, list(prompt_token_ids), params, lora_request=lora_request,
            images=images, cache_salt=cache_salt, priority=priority, token_type_ids=token_type_ids,
        )
        # Images' preprocessing, a grammar's check (the first imports xgrammar, and torch with it, into
        # a server's front end: seconds) and an adapter's first reading: work the event loop must not
        # wait for while it streams the other requests.
        slow = bool(images) or params.structured_outputs is not None or lora_request is not None
        request = await asyncio.to_thread(make) if slow else make()
        children = request.children
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), [child_id for child_id, _ in children])
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None:
                raise self._dead_error()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._pending[request_id] = _Pending(
                accepted, prompt, request.prompt_token_ids, children, time.time(), image_tokens(request.images)
            )
        try:
            self.engine_core.add_request(request)
        except ValueError:
            with self._lock:
                self._streams.pop(request_id, None)
                self._pending.pop(request_id, None)
            raise
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._streams.pop(request_id, None)
            self._send_abort(stream.engine_request_ids)  # in case the engine took it
            raise
        return self._outputs(stream)

    async def _outputs(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        held: Any = None  # an item taken while catching up, for the next turn
        try:
            while not finished:
                item = held if held is not None else await stream.outputs.get()
                held = None
                # A consumer that fell behind takes what has queued since as one output (the
                # latest, its text deltas joined), as vLLM's output collector does: its work per
                # turn stays one chunk, however many steps it missed.
                if isinstance(item, RequestOutput) and not item.finished and not stream.outputs.empty():
                    run = [item]
                    while not run[-1].finished and not stream.outputs.empty():
                        later = stream.outputs.get_nowait()
                        if isinstance(later, Exception):
                            held = later
                            break
                        run.append(later)
                    item = _merged(run)
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
        self.engine_core.abort_requests(engine_request_ids)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.abort()
        if self._dead is not None:  # nothing to wait for: what still runs may never hear "stop"
            self.engine_core.kill()
        self.engine_core.shutdown(timeout)
        self._receiver.join(timeout)  # it stops once the cores have; only then may the sockets close
        self.engine_core.close()

    # The I/O threads -------------------------------------------------------------------------

    def _unsent(self, request_id: str, error: Exception) -> None:
        """The sender thread could not send this request: it fails alone."""
        self._refuse(request_id, RequestAborted(f"request {request_id} could not be sent: {error}"))

    def _receive_loop(self) -> None:
        untrimmed = True  # the start-up's garbage (the tokenizer's load freed ~30 MB) is the first
        try:
            while self._dead is None:
                messages = self.engine_core.get_outputs()
                if messages:
                    # Applied, then the cores' stats published, then the outputs handed to their
                    # streams: a /metrics scrape never sees a step's requests gone before their
                    # tokens are counted, and a client that has read a token sees its request running.
                    deliveries = self._handle_all(messages)
                    self.engine_core.publish_stats()
                    self._deliver(deliveries)
                    untrimmed = True
                    continue
                # Only when no message came: the check is a system call, and each one lets the
                # event loop take the GIL for a switch interval while the outputs wait.
                if not self.engine_core.alive():
                    break
                if untrimmed and not self._streams:
                    # Idle for a poll interval: what the requests' processing freed goes back to
                    # the OS, as the engine core's does.
                    release_free_memory()
                    untrimmed = False
            if not self._stopping:
                self._mark_dead(self.engine_core.cores.exits() or "the engine's receive loop ended")
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
        self._deliver([(request_id, error, True) for request_id in streams])
        for waiting in pending:
            _fail(waiting, error)

    def _handle_all(self, messages: list[FromCore]) -> list[tuple[str, Any, bool]]:
        """Apply messages in order; successive steps' Outputs as one batch, so that a receiver
        that fell behind the core catches up with one output per request, not one per step. What
        the streams are to receive is returned (for _deliver), in order."""
        steps: list[Outputs] = []
        deliveries: list[tuple[str, Any, bool]] = []
        for message in messages:
            if isinstance(message, Outputs):
                steps.append(message)
                continue
            if steps:
                deliveries += self._process(steps)
                steps = []
            deliveries += self._handle(message)
        if steps:
            deliveries += self._process(steps)
        return deliveries

    def _handle(self, message: FromCore) -> list[tuple[str, Any, bool]]:
        """One message other than a step's Outputs (_handle_all batches those); its deliveries."""
        if isinstance(message, Accepted):
            self._accept(message.request_id)
        elif isinstance(message, Refused):
            self._refuse(message.request_id, ValueError(message.message))
        elif isinstance(message, Aborted):
            ended = self._output_processor.abort(message.request_ids)
            _notify(self.finished_listeners, *ended)
            return [(o.request_id, RequestAborted(f"request {o.request_id} was aborted"), True) for o in ended]
        return []

    def _process(self, steps: list[Outputs]) -> list[tuple[str, Any, bool]]:
        self.counters.generation_tokens += sum(len(o.new_token_ids) for step in steps for o in step.outputs)
        applied = [(step, IterationStats(step.num_batched_tokens)) for step in steps]
        outputs, stopped = self._output_processor.process_steps(applied)
        _notify(self.iteration_listeners, *[stats for _, stats in applied])
        if stopped:  # a stop string ended them here: the core must stop them too
            self._send_abort(stopped)
        _notify(self.finished_listeners, *[output for output in outputs if output.finished])
        return [(output.request_id, output, output.finished) for output in outputs]

    def _accept(self, request_id: str) -> None:
        pending = self._take_pending(request_id)
        if pending is None or not pending.accepted.set_running_or_notify_cancel():
            return  # the caller has gone: it aborts the request itself
        self._output_processor.add(
            request_id, pending.prompt, pending.prompt_token_ids, pending.children, pending.arrival_time
        )
        self.counters.prompt_tokens += len(pending.prompt_token_ids)
        self.counters.prompt_image_tokens += pending.num_image_tokens
        pending.accepted.set_result(None)

    def _refuse(self, request_id: str, error: Exception) -> None:
        """A request the core will not run (refused, or never sent to it) fails with error."""
        pending = self._take_pending(request_id)
        if pending is not None:
            _fail(pending, error)

    def _take_pending(self, request_id: str) -> _Pending | None:
        with self._lock:  # the sender, the receiver and _end_all each take a request once
            return self._pending.pop(request_id, None)

    def _deliver(self, items: list[tuple[str, Any, bool]]) -> None:
        """Hand (request id, item, final) to the requests' streams: one callback per event loop,
        so that a step's outputs wake the loop once, not once a request. A final item ends the
        stream here, not in its consumer: a stream nobody iterates (its handler failed first)
        must not stay behind."""
        puts: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item, final in items:
            stream = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
            if stream is not None:
                puts.setdefault(stream.loop, []).append((stream.outputs, item))
        for loop, queued in puts.items():
            try:
                loop.call_soon_threadsafe(_put_all, queued)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass


def _put_all(queued: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in queued:
        queue.put_nowait(item)


def _merged(run: list[RequestOutput]) -> RequestOutput:
    """One output for successive ones of a request: the last, with each child's text deltas
    joined (the rest is cumulative already). Shallow copies: dataclasses.replace re-runs
    __init__, and this runs for every request of every step while the event loop is behind."""
    if len(run) == 1:
        return run[0]
    deltas: dict[int, list[str]] = {}
    for output in run:
        for child in output.outputs:
            deltas.setdefault(child.index, []).append(child.text_delta)
    merged = copy.copy(run[-1])
    merged.outputs = [copy.copy(child) for child in merged.outputs]
    for child in merged.outputs:
        child.text_delta = "".join(deltas[child.index])
    return merged


def _notify(listeners: list[Callable[[Any], None]], *events: Any) -> None:
    for event in events:
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # metrics must never stop the delivery of outputs
                logger.exception("a metrics listener failed")


def _fail(pending: _Pending, error: Exception) -> None:
    if pending.accepted.set_running_or_notify_cancel():  # False: its caller has gone
        pending.accepted.set_exception(error)
