"""Where the server's engine core processes come from: forks of one server process (multiprocessing's
forkserver) that has already imported what a core runs.

A spawned core would import torch, the engine and the model code after the front end has finished
its own imports (seconds each, one after the other). Each core is a fork of a process with one
thread, which is safe where a fork of the front end (its threads, its event loop) is not. It never
touches CUDA: each core initializes its own GPUs.

`pagoda serve` on Linux makes its fork server by forking itself once its imports are done (the
core's modules included) and before it starts a thread: the front end, the fork server and the
cores then share those imports' pages (torch's relocated libraries, the modules' objects: ~200 MB
on the CPU) where a fork server started from a fresh interpreter imports them all again, into
memory of its own that every core copies. Elsewhere the fork server is multiprocessing's own.

Once the server's cores run, the fork server would only sit there holding what it imported: on
Linux the front end becomes a child subreaper, stops it, and adopts the cores it forked
(`AdoptedProcess`), so that it still learns how each ended."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from multiprocessing.context import BaseContext

# What a core imports before it can build its engine: the core's loop and engine, and the model
# code. Its config is Pagoda's own (a ModelSpec): transformers' config classes stay out of the cores
# (pagoda/engine/resolve_apart.py).
CORE_MODULES = ["pagoda.engine.core_proc", "pagoda.models"]
# Random weights are drawn under the names of transformers' own model of the config, which the
# core builds on the meta device: its modeling code takes seconds more to import.
DUMMY_WEIGHT_MODULES = ["transformers.modeling_utils"]


def core_process_context(preload: Sequence[str] = CORE_MODULES) -> BaseContext:
    """The multiprocessing context the engine cores start from."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_server_started_here = False  # by start_core_server: this process is the server, which may stop it


def start_core_server(dummy_weights: bool) -> None:
    """Start the fork server now (the first core would otherwise start it, and wait for its
    imports then), with the core's modules imported: in this process first, and the server a fork
    of it, where it can be (module docstring)."""
    global _server_started_here
    preload = [*CORE_MODULES, *DUMMY_WEIGHT_MODULES] if dummy_weights else CORE_MODULES
    core_process_context(preload)  # sets the preload list, which the server reads when it starts
    # Linux alone: macOS's system libraries (numpy's BLAS among them) are not safe to use after a
    # fork without an exec, which is why Python spawns there.
    if sys.platform == "linux" and threading.active_count() == 1:
        for name in preload:
            importlib.import_module(name)
        # Collections would write to every object's header, copying the pages the forks share:
        # what the imports made lives as long as the process anyway.
        gc.freeze()
        with _fork_server_forked():
            multiprocessing.forkserver.ensure_running()
    else:
        multiprocessing.forkserver.ensure_running()
    _server_started_here = True


_FORK_SERVER_CODE = "from multiprocessing.forkserver import main"


@contextlib.contextmanager
def _fork_server_forked() -> Iterator[None]:
    """multiprocessing starts its fork server by running `python -c CODE` with some descriptors
    passed (util.spawnv_passfds): run CODE in a fork of this process instead, with the same
    descriptors open, so that the server shares this process's imports. Anything else spawned
    meanwhile (multiprocessing's resource tracker, which imports next to nothing) spawns as usual."""
    spawn = multiprocessing.util.spawnv_passfds

    def fork_instead(path: str, args: list[str], passfds: Sequence[int]) -> int:
        if len(args) < 2 or args[-2] != "-c" or not args[-1].startswith(_FORK_SERVER_CODE):
            return spawn(path, args, passfds)
        for stream in (sys.stdout, sys.stderr):  # or the fork and its cores write what they hold again
            if stream is not None:
                stream.flush()
        pid = os.fork()
        if pid == 0:
            _run_forked_server(args[-1], passfds)
        return pid

    multiprocessing.util.spawnv_passfds = fork_instead
    try:
        yield
    finally:
        multiprocessing.util.spawnv_passfds = spawn


def _run_forked_server(code: str, passfds: Sequence[int]) -> None:
    """The fork's life: what an exec would have left open, then the server's code; never returns
    (this process's exit handlers and buffers are the front end's, not the fork's)."""
    status = 1
    try:
        keep = sorted({0, 1, 2, *passfds})
        for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)  # the listening socket among them: the front end's alone
        exec(code, {"__name__": "__pagoda_fork_server__"})
        status = 0
    except SystemExit as stop:  # how the server ends once its clients have all gone
        status = stop.code if isinstance(stop.code, int) else 0
    except BaseException:
        traceback.print_exc()  # before the exit below, which would drop it
    finally:
        os._exit(status)


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
