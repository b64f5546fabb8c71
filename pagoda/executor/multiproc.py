"""One worker process per rank on this host, each on its own pipe.

Workers are forked, as vLLM's are (VLLM_WORKER_MULTIPROC_METHOD): a spawned worker re-runs the
user's main script, which breaks a script written without `if __name__ == "__main__":`, as the
quick-starts write them. They are spawned where fork cannot work (CUDA is initialized in this
process) or PAGODA_WORKER_MULTIPROC_METHOD=spawn asks for it. The engine forks before it builds
anything of the model (the workers do): a child inherits little more than the configuration and
the tokenizer, and none of the threads; it closes its copies of the other workers' pipes, and
runs its rank on a fresh thread (see worker.run_worker).

A call is pickled once and written to every pipe (a step as a StepMessage: what changed since the
last one); every rank answers every call, in order, and the answer of the rank that samples is the
result. A posted call's answer (a step's launch, its deferred masks) is left in the pipe until the
next call that waits reads it. A rank that fails, or dies, fails the call: the other ranks may be
stuck in a collective waiting for it, so every worker is stopped and the executor is done."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.util import register_after_fork
from pathlib import Path
from typing import Any

import torch

from pagoda.config.groups import ResolvedConfig
from pagoda.executor.base import ExecutorDeadError, RankExecutor
from pagoda.worker.worker import cpu_threads_per_rank, replicas_init_method, run_worker

logger = logging.getLogger("pagoda")

_SHUTDOWN_GRACE_S = 5.0
START_METHOD_ENV = "PAGODA_WORKER_MULTIPROC_METHOD"
_MAIN_GUARD_HINT = (
    "a spawned worker re-runs the main script, so a script must keep its code under "
    '`if __name__ == "__main__":`'
)


def worker_start_method() -> str:
    """fork, unless PAGODA_WORKER_MULTIPROC_METHOD=spawn or CUDA is initialized in this process
    (a forked child cannot use it): vLLM's rule for VLLM_WORKER_MULTIPROC_METHOD."""
    requested = os.environ.get(START_METHOD_ENV, "fork")
    if requested not in ("fork", "spawn"):
        raise ValueError(f"{START_METHOD_ENV}={requested!r} is invalid: must be 'fork' or 'spawn'")
    if requested == "fork" and torch.cuda.is_initialized():
        logger.warning(
            "CUDA is initialized in this process, so the worker processes are spawned, not forked "
            "(%s=spawn): %s", START_METHOD_ENV, _MAIN_GUARD_HINT,
        )
        return "spawn"
    return requested


class MultiprocExecutor(RankExecutor):
    def __init__(self, config: ResolvedConfig) -> None:
        if multiprocessing.current_process().daemon:
            raise RuntimeError(
                f"{config.parallel.world_size} ranks need worker processes, and this process is a daemon, which "
                "Python does not let start processes: run the engine in a non-daemon process"
            )
        self._store = tempfile.mkdtemp(prefix="pagoda-dist-")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        # Stops the workers when this executor is shut down, collected, or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns, self._store, os.getpid())
        super().__init__(config)
        self._unanswered = 0  # calls posted whose answers are still in the pipes
        self._config = config
        start_method = worker_start_method()
        context = multiprocessing.get_context(start_method)
        parallel = config.parallel
        init_method = (replicas_init_method(parallel) if parallel.experts_span_replicas
                       else (Path(self._store) / "store").as_uri())
        for rank in range(config.parallel.world_size):
            parent_end, child_end = context.Pipe()
            # A later worker forked with this end open would keep this rank's pipe from closing
            # when the engine's process dies.
            register_after_fork(parent_end, Connection.close)
            process = context.Process(
                target=run_worker, args=(config, rank, init_method, child_end),
                name=f"pagoda-worker-{rank}", daemon=True,
            )
            process.start()
            child_end.close()
            self._procs.append(process)
            self._conns.append(parent_end)
        try:
            self._collect()  # every rank has built its shard, or the first failure raises
        except RuntimeError as error:
            if start_method == "spawn":
                raise RuntimeError(f"{error}\n(workers were spawned: {_MAIN_GUARD_HINT})") from None
            raise

    def allocate_kv_cache(self, num_blocks: int) -> None:
        reserved = sum(self._call("allocate_kv_cache", num_blocks))
        if self._config.device.device.type == "cpu":
            self._log_cpu_cost(reserved)

    def shutdown(self) -> None:
        self._finalizer()

    def _log_cpu_cost(self, kv_bytes: int) -> None:
        """What several ranks on one host's CPU cost, which a user cannot see otherwise."""
        ranks, cores = self._config.parallel.world_size, os.cpu_count() or 1
        oversubscribed = ranks > cores
        logger.log(
            logging.WARNING if oversubscribed else logging.INFO,
            "CPU run on %d ranks: %d worker processes x %d threads each for %d cores%s; KV cache of %.3g GiB "
            "reserved in total (%.3g GiB a rank)", ranks, ranks, cpu_threads_per_rank(ranks), cores,
            " (more ranks than cores: every step waits on ranks sharing a core)" if oversubscribed else "",
            kv_bytes / 2**30, kv_bytes / ranks / 2**30,
        )

    def _post(self, method: str, *args: Any) -> None:
        if not self._finalizer.alive:
            raise ExecutorDeadError("the executor's worker processes have stopped (shut down, or a rank failed)")
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self._conns:
            try:
                conn.send_bytes(message)
            except OSError:  # a dead worker's pipe: _collect reports it
                pass
        self._unanswered += 1

    def _call(self, method: str, *args: Any) -> list[Any]:
        self._post(method, *args)
        for _ in range(self._unanswered - 1):  # the answers to the calls posted before this one
            self._collect()
        self._unanswered = 0
        return self._collect()

    def _collect(self) -> list[Any]:
        """Every rank's answer, in rank order; the first failure stops all workers and raises."""
        results: list[Any] = [None] * len(self._conns)
        pending = set(range(len(self._conns)))
        while pending:
            wait([self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending])
            for rank in sorted(pending):
                if self._conns[rank].poll():
                    results[rank] = self._receive(rank)
                    pending.discard(rank)
                elif not self._procs[rank].is_alive():
                    self._fail(f"worker rank {rank} died (exit code {self._procs[rank].exitcode})")
        return results

    def _receive(self, rank: int) -> Any:
        try:
            status, value = self._conns[rank].recv()
        except (EOFError, OSError):  # its end closed, or reset as it died
            self._procs[rank].join(_SHUTDOWN_GRACE_S)
            self._fail(f"worker rank {rank} died (exit code {self._procs[rank].exitcode})")
        if status == "error":
            self._fail(f"worker rank {rank} failed:\n{value}")
        return value

    def _fail(self, message: str) -> None:
        self._finalizer.detach()
        _stop_workers(self._procs, self._conns, self._store, os.getpid(), grace_s=0.0)
        raise ExecutorDeadError(message)


def _stop_workers(
    procs: list[BaseProcess], conns: list[Connection], store: str, owner: int, grace_s: float = _SHUTDOWN_GRACE_S
) -> None:
    """Ask each worker to stop, then terminate (and at last kill) those still running."""
    if os.getpid() != owner:  # a forked worker collecting its copy of an executor: not its workers
        return
    for conn in conns:
        try:
            conn.send(("shutdown", ()))
        except OSError:  # its end is already closed
            pass
    for process in procs:
        process.join(grace_s)
        if process.is_alive():
            process.terminate()
            process.join(grace_s or 1.0)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(store, ignore_errors=True)
