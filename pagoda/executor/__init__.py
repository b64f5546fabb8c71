"""Executors: how the engine runs its model on one rank or many (see base.Executor)."""

from __future__ import annotations

from pagoda.executor.base import Executor
from pagoda.worker.worker import WorkerConfig


def make_executor(config: WorkerConfig) -> Executor:
    """In this process for one rank; one worker process per rank for several."""
    if config.world_size == 1:
        from pagoda.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config)
    from pagoda.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config)
