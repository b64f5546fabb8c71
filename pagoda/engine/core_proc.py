"""The engine core process: an EngineCore step loop fed over ZeroMQ, so that model execution never
competes with the HTTP server for the GIL. It knows engine requests only (n=1 each), takes and
sends token ids, never text, and imports no tokenizer: the front end detokenizes, checks stop
strings and gathers n>1 requests (it aborts a request a stop string ended).

Messages are the typed structs of messages.py: EngineCoreRequest, AbortRequests and Stop in;
Ready (or Failed) once, then Accepted / Refused per request, Aborted and Outputs out. The core
blocks on its input while it has no work (after a second of it, it hands the memory its steps
freed back to the OS), and exits when told to stop or when the front end's process
is gone. A failed step aborts every request and the core goes on, unless a rank has died
(ExecutorDeadError): then the core exits nonzero, and the front end, seeing it end, dies too.

When the MoE experts span the data-parallel replicas the cores step in lockstep (lockstep.py):
each runs a step, or a dummy step, whenever any has work; a failed step ends the core, since the
other replicas may be waiting inside its MoE exchange."""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
from pathlib import Path

import torch
import zmq

from pagoda.child_signals import leave_shutdown_to_the_front_end
from pagoda.config.groups import ResolvedConfig
from pagoda.engine.core import EngineCore
from pagoda.engine.lockstep import IDLE_WAIT_MS, ReplicaVote
from pagoda.engine.messages import (
    Aborted,
    AbortRequests,
    Accepted,
    EngineCoreRequest,
    Failed,
    FromCore,
    Outputs,
    Ready,
    Refused,
    Stop,
    decode_to_core,
    encode,
)
from pagoda.executor.base import ExecutorDeadError
from pagoda.executor.multiproc import START_METHOD_ENV
from pagoda.exit_now import exit_now
from pagoda.free_memory import release_free_memory
from pagoda.logger import log_to_stderr
from pagoda.process_time import seconds_since_process_start

logger = logging.getLogger("pagoda")

_FRONT_END_CHECK_MS = 1000  # how often an idle core checks that the front end is still alive
_SEND_TIMEOUT_MS = 60_000


def _name_process(name: str) -> None:
    """The process's name as ps and top show it (Linux keeps 15 bytes), so that a core is told
    from the fork server it came from."""
    try:
        Path("/proc/self/comm").write_text(name[:15])
    except OSError:
        pass


def run_engine_core(
    config: ResolvedConfig, input_address: str, output_address: str, log_level: int,
    env: dict[str, str], front_end_pid: int,
) -> None:
    """The child process's main function; env: the environment to run with (the front end's, with
    this core's GPUs or threads)."""
    os.environ.clear()
    os.environ.update(env)
    _name_process(multiprocessing.current_process().name)
    # This process is Pagoda's own, its main module guarded: its workers may be spawned, the
    # method that works everywhere (as `vllm serve` sets VLLM_WORKER_MULTIPROC_METHOD).
    os.environ.setdefault(START_METHOD_ENV, "spawn")
    if "OMP_NUM_THREADS" in env:  # torch read the variable when it was imported, before this
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # The front end owns shutdown: the core keeps running until the front end has aborted its
    # requests and told it to stop, though Ctrl-C or systemd's SIGTERM reached it too.
    leave_shutdown_to_the_front_end()
    log_to_stderr(log_level)
    started = seconds_since_process_start()
    if started is not None:  # from its fork: its config's unpickling, any import not preloaded
        logger.info("engine core process up in %.1f s", started)
    front_end = _FrontEnd(front_end_pid)
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    # A send blocked this long means the front end is gone: give up rather than hang.
    outputs.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
    inputs.connect(input_address)
    outputs.connect(output_address)
    try:
        core = EngineCore(config)
    except Exception as error:  # the front end reports it and exits
        outputs.send(encode(Failed(f"{type(error).__name__}: {error}")))
        return
    outputs.send(encode(Ready(core.max_model_len, core.model_name, core.num_kv_blocks)))
    try:
        if config.parallel.experts_span_replicas:
            parallel = config.parallel
            logger.info(
                "replica %d of %d: MoE experts over the %d ranks of the replicas (DP x TP), stepping in lockstep",
                parallel.data_parallel_rank, parallel.data_parallel_size,
                parallel.data_parallel_size * parallel.tensor_parallel_size,
            )
            _LockstepCoreLoop(core, inputs, outputs, front_end, ReplicaVote(parallel)).run()
        else:
            _CoreLoop(core, inputs, outputs, front_end).run()
    finally:
        core.shutdown()  # its worker processes, told to stop and joined
        context.destroy(linger=1000)
    exit_now(0)


class _FrontEnd:
    """Whether the front end that started this core still runs. The core's parent is the fork
    server (or, once the server's front end has stopped it, the front end; then init when that
    dies), so the core watches the front end itself: through a pidfd (readable once that process
    has exited, and never another's) where Linux gives one, else by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        exited: select.poll | None = select.poll()
        try:
            exited.register(os.pidfd_open(pid), select.POLLIN)
        except (AttributeError, OSError):  # not Linux >= 5.3, or already gone
            exited = None
        self._exited = exited

    def alive(self) -> bool:
        if self._exited is not None:
            return not self._exited.poll(0)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class _CoreLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, front_end: _FrontEnd) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        self.front_end = front_end

    def run(self) -> None:
        while self.front_end.alive():  # else nobody will ever read an output
            busy = self.core.has_unfinished_requests()
            if not self._handle_inputs(block=not busy):
                return
            if self.core.has_unfinished_requests():
                self._step()

    def _handle_inputs(self, block: bool) -> bool:
        """Apply waiting messages (waiting for one if block); False once told to stop."""
        trimmed = False
        while True:
            if not self.inputs.poll(_FRONT_END_CHECK_MS if block else 0):
                if not block:
                    return True
                if not self.front_end.alive():
                    return False
                if not trimmed:  # idle for a while: what the last steps freed goes back to the OS
                    release_free_memory()
                    trimmed = True
                continue
            message = decode_to_core(self.inputs.recv())
            if isinstance(message, Stop):
                return False
            self._apply(message)
            block = False

    def _apply(self, message: EngineCoreRequest | AbortRequests) -> None:
        if isinstance(message, AbortRequests):
            self._abort(message.request_ids)
            return
        try:
            self.core.add_request(message)
        except ValueError as error:  # the front end reports it; the core is unchanged
            self._send(Refused(message.request_id, str(error)))
            return
        self._send(Accepted(message.request_id))

    def _abort(self, request_ids: list[str] | None) -> None:
        aborted = self.core.abort_requests(request_ids)
        self._send(Aborted(aborted, self.core.scheduler.stats()))

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except ExecutorDeadError:
            raise  # no rank is left to run a step: the process ends, and the front end with it
        except Exception:
            # The batch's state is unknown after a failed step: end every request.
            logger.exception("engine step failed; aborting all requests")
            self._abort(None)
            return
        self._send(Outputs(outputs, self.core.scheduler.stats(), self.core.num_batched_tokens))

    def _send(self, message: FromCore) -> None:
        self.outputs.send(encode(message))


class _LockstepCoreLoop(_CoreLoop):
    """The loop of one replica among those whose experts span them: it steps whenever any has work."""

    def __init__(
        self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, front_end: _FrontEnd, vote: ReplicaVote
    ) -> None:
        super().__init__(core, inputs, outputs, front_end)
        self.vote = vote

    def run(self) -> None:
        running = False
        while True:
            if not running:
                self.inputs.poll(IDLE_WAIT_MS)  # wait a little for work before the next vote
            told = not (self._handle_inputs(block=False) and self.front_end.alive())
            try:
                running, stop = self.vote.tally(self.core.has_unfinished_requests(), told)
            except RuntimeError:  # gloo's error when a peer's connection breaks
                logger.error("the engine core of another data-parallel replica is gone: this one steps no more")
                running, stop = False, True
            if told:
                return
            if stop:
                break
            if running:
                self._step_or_dummy()
        # Another core stopped first: this one ends when the front end, which sees that, says so
        # (or is gone), as a core on its own would; one ending unasked could block the front end's
        # last send to it.
        while self._handle_inputs(block=True):
            pass

    def _step(self) -> None:
        # Not caught, unlike a core on its own: a step that failed may have left the other
        # replicas inside an MoE layer's exchange, which no later step of this core would match.
        # The core ends, and the front end with it.
        outputs = self.core.step()
        self._send(Outputs(outputs, self.core.scheduler.stats(), self.core.num_batched_tokens))

    def _step_or_dummy(self) -> None:
        # Asynchronous scheduling is off here (config/resolve.py): a step that computed tokens ran
        # the model once, and one that computed none ran nothing.
        if self.core.has_unfinished_requests():
            self._step()
            if self.core.num_batched_tokens:
                return
        self.core.execute_dummy_batch()
