"""Executors: how the engine runs its model on one rank or many (see base.Executor)."""

from __future__ import annotations

from pagoda.config.groups import ResolvedConfig
from pagoda.executor.base import Executor


def make_executor(config: ResolvedConfig) -> Executor:
    """One Ray actor per rank when Ray is asked for; else in this process for one rank, one worker
    process per rank for several."""
    if config.parallel.distributed_executor_backend == "ray":
        from pagoda.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    if config.parallel.world_size == 1:
        from pagoda.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config)
    from pagoda.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config)
