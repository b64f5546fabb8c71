"""The engine core processes behind one MPClient (the server's): one, or data_parallel_size of
them, each on its own group of tensor x pipeline GPUs (CUDA_VISIBLE_DEVICES), or its share of the
CPU threads. Where an MoE model's experts span the replicas, each core is told its replica rank
and a directory where the replicas' ranks meet (engine/lockstep.py).

A request goes to the core with the fewest unfinished engine requests, counted here as they are
sent and as the cores report them ended (so a burst is spread at once, before any stats arrive).
Stats are the cores' sum; KV usage is their mean, every core having a pool of the same size."""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

from pagoda.config.groups import ResolvedConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.core_launcher import AdoptedProcess, core_process_context, run_core, stop_core_server
from pagoda.engine.messages import Failed, FromCore, decode_from_core

logger = logging.getLogger("pagoda")

_POLL_MS = 500  # how often the receiver checks that it should go on


@dataclass
class _Core:
    process: multiprocessing.process.BaseProcess | AdoptedProcess
    to_core: zmq.Socket
    from_core: zmq.Socket
    stats: SchedulerStats = dataclasses.field(default_factory=lambda: SchedulerStats(0, 0, 0.0, 0, 0, 0))
    outstanding: int = 0  # engine requests sent and not yet reported ended
    routed: int = 0  # engine requests sent since start


class CoreGroup:
    def __init__(self, config: ResolvedConfig) -> None:
        """Start the core processes; they build their engines meanwhile (wait_ready() before use).
        Every core gets the same config (its layout was checked whole) and its own GPUs."""
        self._dir = tempfile.TemporaryDirectory(prefix="pagoda-")
        self._context = zmq.Context()
        self._lock = threading.Lock()  # the outstanding counts: the event loop adds, the receiver ends
        self.cores = [
            self._start(i, self._replica_config(config, i), env) for i, env in enumerate(_core_environments(config))
        ]
        atexit.register(self.kill)  # runs before multiprocessing joins its children
        self._poller = zmq.Poller()
        for core in self.cores:
            self._poller.register(core.from_core, zmq.POLLIN)
            self._poller.register(core.process.sentinel, zmq.POLLIN)  # readable once the process has ended
        self._sockets = {core.from_core: i for i, core in enumerate(self.cores)}
        self.max_model_len, self.model_name, self.num_gpu_blocks = 0, "", 0

    def wait_ready(self) -> None:
        """Block until every core has built its engine; a core's start-up error is raised here
        (the caller kills the group). Then the fork server that started them may go."""
        ready = [self._wait_ready(core) for core in self.cores]
        self.max_model_len, self.model_name, self.num_gpu_blocks = ready[0]
        adopted = stop_core_server([core.process.pid for core in self.cores])
        for core, process in zip(self.cores, adopted or []):
            self._poller.unregister(core.process.sentinel)  # the fork server's pipe: at its end, readable for good
            core.process = process
            self._poller.register(process.sentinel, zmq.POLLIN)

    def _replica_config(self, config: ResolvedConfig, index: int) -> ResolvedConfig:
        """The config of core `index`: where the experts span the replicas, its rank among them
        and where their ranks meet (this group's directory)."""
        if not config.parallel.experts_span_replicas:
            return config
        parallel = dataclasses.replace(
            config.parallel, data_parallel_rank=index, data_parallel_rendezvous=self._dir.name
        )
        return dataclasses.replace(config, parallel=parallel)

    def _start(self, index: int, config: ResolvedConfig, env: dict[str, str]) -> _Core:
        addresses = [f"ipc://{Path(self._dir.name) / f'{name}{index}'}" for name in ("in", "out")]
        to_core, from_core = self._context.socket(zmq.PUSH), self._context.socket(zmq.PULL)
        to_core.bind(addresses[0])
        from_core.bind(addresses[1])
        # Not a daemon: with tensor or pipeline parallelism the core starts worker processes,
        # which a daemon may not; an exit that skipped shutdown() kills it (`kill`). The core
        # runs with this process's environment as of now (the fork server's is older).
        process = core_process_context().Process(
            target=run_core, name=f"pagoda-core-{index}", daemon=False,
            args=(config, *addresses, logging.getLogger().getEffectiveLevel(), {**os.environ, **env}, os.getpid()),
        )
        process.start()
        return _Core(process, to_core, from_core)

    def _wait_ready(self, core: _Core) -> tuple[int, str, int]:
        while not core.from_core.poll(_POLL_MS):
            if not core.process.is_alive():
                raise RuntimeError(f"the engine core process exited with {core.process.exitcode} while starting")
        message = decode_from_core(core.from_core.recv())
        if isinstance(message, Failed):
            core.process.join(10)
            raise ValueError(message.message)
        return message.max_model_len, message.model_name, message.num_gpu_blocks

    def alive(self) -> bool:
        return all(core.process.is_alive() for core in self.cores)

    # Routing (any thread) ---------------------------------------------------------------------

    def pick(self, num_requests: int) -> int:
        """The core for a request of num_requests engine requests: the least loaded one."""
        with self._lock:
            index = min(range(len(self.cores)), key=lambda i: self.cores[i].outstanding)
            self.cores[index].outstanding += num_requests
            self.cores[index].routed += num_requests
        return index

    def ended(self, index: int, num_requests: int) -> None:
        with self._lock:
            self.cores[index].outstanding -= num_requests

    @property
    def num_waiting(self) -> int:
        """Engine requests sent and not yet running: those sent and not ended are counted here as
        they go and end, the running ones come from each core's latest stats (at most a step old,
        so a request the next step admits still counts as waiting)."""
        return sum(max(0, core.outstanding - core.stats.num_running) for core in self.cores)

    # The I/O threads: one sends, one receives (ZeroMQ sockets are not thread-safe) -------------

    def send(self, index: int | None, data: bytes) -> None:
        """An encoded message to one core, or to all of them (None). A core that has exited is
        skipped: with no reader, the send would block for good."""
        for core in self.cores if index is None else [self.cores[index]]:
            if core.process.is_alive():
                core.to_core.send(data)

    def receive(self) -> list[tuple[int, FromCore]]:
        """(core index, message): every message queued at each core that has one within
        _POLL_MS, in order. A core process that ends wakes the poll at once (alive() says which)."""
        received = []
        for socket, _ in self._poller.poll(_POLL_MS):
            index = self._sockets.get(socket)
            if index is None:  # a sentinel: alive() says which core has ended
                continue
            # All that queued, not one per poll: a receiver that fell behind catches up without a
            # poll (a system call, and the GIL given up) per message.
            received.extend((index, decode_from_core(data)) for data in _queued(socket))
        return received

    def exits(self) -> str:
        """How each core process that has ended did (empty if none has)."""
        return "; ".join(
            f"engine core {i} (pid {core.process.pid}) {_exit_status(core.process.exitcode)}"
            for i, core in enumerate(self.cores) if core.process.exitcode is not None
        )

    @property
    def stats(self) -> SchedulerStats:
        all_stats = [core.stats for core in self.cores]
        return SchedulerStats(
            num_running=sum(s.num_running for s in all_stats),
            num_waiting=sum(s.num_waiting for s in all_stats),
            kv_cache_usage=sum(s.kv_cache_usage for s in all_stats) / len(all_stats),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in all_stats),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in all_stats),
            num_preemptions=sum(s.num_preemptions for s in all_stats),
            num_drafts=sum(s.num_drafts for s in all_stats),
            num_draft_tokens=sum(s.num_draft_tokens for s in all_stats),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in all_stats),
            num_accepted_tokens_per_pos=tuple(
                map(sum, itertools.zip_longest(*(s.num_accepted_tokens_per_pos for s in all_stats), fillvalue=0))
            ),
        )

    def shutdown(self, timeout: float = 5.0) -> None:
        """After the sender has told the cores to stop: wait for them (kill what lingers)."""
        for i, core in enumerate(self.cores):
            core.process.join(timeout)
            if core.process.is_alive():
                logger.warning("engine core %d did not stop within %.0f s: killing it", i, timeout)
                core.process.kill()
                core.process.join(timeout)

    def kill(self) -> None:
        """Stop whatever core still runs, at once (start-up failed, or an exit skipped shutdown())."""
        for core in self.cores:
            if core.process.is_alive():
                core.process.kill()
                core.process.join(1)

    def close(self) -> None:
        """Once the receiver has stopped: the sockets and their directory."""
        self._context.destroy(linger=0)
        self._dir.cleanup()


def _exit_status(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"was killed by signal {-exitcode}"


def _core_environments(config: ResolvedConfig) -> list[dict[str, str]]:
    """Each core's environment: its group of tensor x pipeline GPUs, or its share of the CPU."""
    dp = config.parallel.data_parallel_size
    if dp == 1:
        return [{}]
    if config.device.device.type == "cpu":
        # Cores sharing the CPU would each start a thread per core and fight over them.
        return [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // dp))}] * dp
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        import torch

        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    gpus = visible.split(",")
    size = config.parallel.world_size
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * size : (i + 1) * size])} for i in range(dp)]


def _queued(socket: zmq.Socket) -> list[bytes]:
    """The messages a socket that polled readable holds now (one at least)."""
    messages = [socket.recv()]
    while True:
        try:
            messages.append(socket.recv(zmq.NOBLOCK))
        except zmq.Again:
            return messages
