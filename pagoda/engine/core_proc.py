"""The engine core process: an LLMEngine step loop fed over ZeroMQ, so that model execution never
competes with the HTTP server for the GIL. It knows engine requests only (n=1 each) and sends
token ids, never text: the front end's OutputProcessor detokenizes, checks stop strings and gathers
n>1 requests (it aborts a request a stop string ended).

Messages (msgpack, see serial.py), front end -> core: ["add", user request id, token_ids,
[[engine request id, params], ...]], ["abort", engine request ids or None], ["stop"]. Core ->
front end: ["ready", max_model_len, vocab_size, model_name], ["accepted", id], ["refused", id,
message], ["aborted", engine request ids, stats], ["outputs", [core output...], stats]. The core
blocks on its input while it has no work, and exits when told to stop or when its parent process
is gone."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import torch
import zmq

from pagoda.config import EngineConfig
from pagoda.engine import serial
from pagoda.engine.llm_engine import LLMEngine
from pagoda.executor.multiproc import START_METHOD_ENV
from pagoda.exit_now import exit_now

logger = logging.getLogger("pagoda")

_PARENT_CHECK_MS = 1000  # how often an idle core checks that its parent is still alive
_SEND_TIMEOUT_MS = 60_000


def run_engine_core(
    config: EngineConfig, input_address: str, output_address: str, log_level: int, env: dict[str, str]
) -> None:
    """The child process's main function; env: variables to set first (its GPUs, its threads)."""
    os.environ.update(env)
    # This process is Pagoda's own, its main module guarded: its workers may be spawned, the
    # method that works everywhere (as `vllm serve` sets VLLM_WORKER_MULTIPROC_METHOD).
    os.environ.setdefault(START_METHOD_ENV, "spawn")
    if "OMP_NUM_THREADS" in env:  # torch read the variable when it was imported, before this
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # The front end owns shutdown: Ctrl-C reaches the whole process group, and the core must
    # keep running until the front end has aborted its requests and told it to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parent = os.getppid()
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    # A send blocked this long means the front end is gone: give up rather than hang.
    outputs.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
    inputs.connect(input_address)
    outputs.connect(output_address)
    try:
        engine = LLMEngine(config)
    except Exception as error:  # the front end reports it and exits
        outputs.send(serial.pack(["failed", f"{type(error).__name__}: {error}"]))
        return
    outputs.send(serial.pack(["ready", engine.max_model_len, engine.vocab_size, engine.model_name]))
    try:
        _Core(engine, inputs, outputs, parent).run()
    finally:
        engine.shutdown()  # its worker processes, told to stop and joined
        context.destroy(linger=1000)
    exit_now(0)


class _Core:
    def __init__(self, engine: LLMEngine, inputs: zmq.Socket, outputs: zmq.Socket, parent: int) -> None:
        self.engine = engine
        self.inputs = inputs
        self.outputs = outputs
        self.parent = parent

    def run(self) -> None:
        while os.getppid() == self.parent:  # orphaned: nobody will ever read an output
            busy = self.engine.has_unfinished_requests()
            if not self._handle_inputs(block=not busy):
                return
            if self.engine.has_unfinished_requests():
                self._step()

    def _handle_inputs(self, block: bool) -> bool:
        """Apply waiting messages (waiting for one if block); False once told to stop."""
        while True:
            if not self.inputs.poll(_PARENT_CHECK_MS if block else 0):
                if not block:
                    return True
                if os.getppid() != self.parent:
                    return False
                continue
            message = serial.unpack(self.inputs.recv())
            if message[0] == "stop":
                return False
            self._apply(message)
            block = False

    def _apply(self, message: list[Any]) -> None:
        if message[0] == "abort":
            self._abort(message[1])
            return
        _, request_id, token_ids, children = message
        try:
            self.engine.add_core_requests(token_ids, [(cid, serial.decode_params(p)) for cid, p in children])
        except ValueError as error:  # the front end reports it; the engine is unchanged
            self._send(["refused", request_id, str(error)])
            return
        self._send(["accepted", request_id])

    def _abort(self, request_ids: list[str] | None) -> None:
        aborted = self.engine.abort_core_requests(request_ids)
        self._send(["aborted", aborted, serial.encode_stats(self.engine.scheduler.stats())])

    def _step(self) -> None:
        try:
            outputs = self.engine.step_core()
        except Exception:
            # The batch's state is unknown after a failed step: end every request.
            logger.exception("engine step failed; aborting all requests")
            self._abort(None)
            return
        self._send(["outputs", serial.encode_outputs(outputs), serial.encode_stats(self.engine.scheduler.stats())])

    def _send(self, message: list[Any]) -> None:
        self.outputs.send(serial.pack(message))
