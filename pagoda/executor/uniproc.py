"""One rank, in the engine's own process: no pipes, and no process group unless the MoE experts
span the data-parallel replicas (then this process is its replica's rank in their world)."""

from __future__ import annotations

from pagoda.config.groups import ResolvedConfig
from pagoda.core.scheduler import SchedulerOutput
from pagoda.distributed.parallel_state import destroy_parallel
from pagoda.executor.base import Executor
from pagoda.worker.model_runner import PendingStep
from pagoda.worker.worker import KVBudget, Worker, join_process_groups, replicas_init_method


class UniprocExecutor(Executor):
    def __init__(self, config: ResolvedConfig) -> None:
        self._in_world = config.parallel.experts_span_replicas
        if self._in_world:
            join_process_groups(config, 0, replicas_init_method(config.parallel))
        self.worker = Worker(config)

    def num_kv_blocks_that_fit(self, budget: KVBudget) -> int:
        return self.worker.num_kv_blocks_that_fit(budget)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> PendingStep:
        return self.worker.runner.launch(scheduler_output, defer_sampling)

    def execute_dummy_batch(self) -> None:
        self.worker.execute_dummy_batch()

    def shutdown(self) -> None:
        if self._in_world:
            self._in_world = False
            destroy_parallel()
