"""Where the server's engine core processes come from: forks of one server process (multiprocessing's
forkserver) that has already imported what a core runs.

A spawned core would import torch, the engine and the model code only once it is started (seconds).
Each core is a fork of a process with one thread, which is safe where a fork of the front end (its
threads, its event loop) is not. It never touches CUDA: each core initializes its own GPUs.

`pagoda serve` starts the fork server first thing, so that it imports torch and the engine while
the front end starts; the front end itself imports neither (it tokenizes, routes and detokenizes:
~200 MB less), and resolves the engine's configuration in a fork of the server
(engine/resolve_apart.py). Once the server's cores run, the fork server would only sit there holding
what it imported: on Linux the front end becomes a child subreaper, stops it, and adopts the cores
it forked (`AdoptedProcess`), so that it still learns how each ended."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import threading
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from typing import Any

# What a core imports before it can build its engine: the core's loop and engine, and the model
# code. Its config is Pagoda's own (a ModelSpec): transformers' config classes stay out of the cores
# (pagoda/engine/resolve_apart.py).
# Not transformers' modeling code, which random weights' names come from (~3 s more to import
# on a GPU host, before the configuration could be resolved in a fork of this server): a core
# imports it only when those names are not on disk yet (loader/weights.py).
CORE_MODULES = ["pagoda.engine.core_proc", "pagoda.models"]


def run_core(*args: Any) -> None:
    """An engine core's main function (core_proc.run_engine_core), as the process starting it
    names it: that process (the server's front end) imports no torch, which core_proc does."""
    from pagoda.engine.core_proc import run_engine_core

    run_engine_core(*args)


def core_process_context(preload: Sequence[str] = CORE_MODULES) -> BaseContext:
    """The multiprocessing context the engine cores start from."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_server_started_here = False  # by start_core_server: this process is the server, which may stop it


def start_core_server() -> None:
    """Start the fork server now, importing the core's modules while this process goes on (the
    first core would otherwise start it, and wait for its imports then)."""
    global _server_started_here
    core_process_context()
    multiprocessing.forkserver.ensure_running()
    _server_started_here = True


def stop_core_server(pids: Sequence[int]) -> list[AdoptedProcess] | None:
    """Stop the fork server that start_core_server started, and adopt the cores it forked (`pids`,
    running): their handles, or None where it stays (another process's, or not Linux: a pidfd and
    a child subreaper are what let this process watch and reap them). Library users of the engine
    keep theirs: becoming a subreaper changes the whole process."""
    server = multiprocessing.forkserver._forkserver  # private: checked, so a Python without it keeps the server
    if not (_server_started_here and hasattr(os, "pidfd_open") and getattr(server, "_forkserver_pid", None)
            and hasattr(server, "_stop")):
        return None
    try:
        pidfds = [os.pidfd_open(pid) for pid in pids]  # before the stop: these are the cores, whatever happens
    except OSError:  # a kernel before 5.3
        return None
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        for pidfd in pidfds:
            os.close(pidfd)
        return None
    # Its children hold its lifeline's write end too (to fork in turn), so it would outlive them:
    # ended, then forgotten (a later core would start another); the cores are now ours.
    os.kill(server._forkserver_pid, signal.SIGTERM)
    server._stop()
    return [AdoptedProcess(pid, pidfd) for pid, pidfd in zip(pids, pidfds)]


class AdoptedProcess:
    """A core whose fork server has gone, now this process's child: the part of
    multiprocessing's Process that the core group uses (from any thread: one reaps it, under a
    lock, and the others read what it found)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.sentinel = pidfd  # readable once the process has ended
        self._exitcode: int | None = None
        self._lock = threading.Lock()

    @property
    def exitcode(self) -> int | None:
        """As multiprocessing's: the exit status, or minus the signal that killed it; None while it runs."""
        return self._reap()

    def is_alive(self) -> bool:
        return self._reap() is None

    def join(self, timeout: float | None = None) -> None:
        select.select([self.sentinel], [], [], timeout)
        self._reap()

    def kill(self) -> None:
        # Through the pidfd: never another process, as a reused pid could be; one that has just
        # ended is not there to signal.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)

    def _reap(self) -> int | None:
        with self._lock:
            if self._exitcode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self._exitcode = os.waitstatus_to_exitcode(status)
            return self._exitcode
