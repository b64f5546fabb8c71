"""One rank, in the engine's own process: no pipes, no process group."""

from __future__ import annotations

from pagoda.config.groups import ResolvedConfig
from pagoda.core.scheduler import SchedulerOutput
from pagoda.executor.base import Executor
from pagoda.worker.model_runner import PendingStep
from pagoda.worker.worker import KVBudget, Worker


class UniprocExecutor(Executor):
    def __init__(self, config: ResolvedConfig) -> None:
        self.worker = Worker(config)

    def num_kv_blocks_that_fit(self, budget: KVBudget) -> int:
        return self.worker.num_kv_blocks_that_fit(budget)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> PendingStep:
        return self.worker.runner.launch(scheduler_output, defer_sampling)
