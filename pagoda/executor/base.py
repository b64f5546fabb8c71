"""The executor interface: what the engine asks of the ranks that hold the model.

The engine schedules once and hands each step's SchedulerOutput to its executor; the executor
gets it to every rank (in this process, to worker processes over pipes, or, in a multi-node
executor, to Ray actors) and returns the output of the rank that samples. Each rank holds its share
of the KV cache, all with the same number of blocks, so one block table serves every rank."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.core.scheduler import SchedulerOutput
from pagoda.worker.model_runner import ModelRunnerOutput, PendingStep
from pagoda.worker.worker import KVBudget


class ExecutorDeadError(RuntimeError):
    """A rank failed or died: every rank has been stopped, and the engine cannot go on (its
    process ends, as vLLM's engine core does on an executor failure)."""


class Executor(ABC):
    @abstractmethod
    def num_kv_blocks_that_fit(self, budget: KVBudget) -> int:
        """The most KV blocks every rank has room for (the fewest over the ranks)."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Give every rank a KV cache of `num_blocks` blocks."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; the sampled tokens."""

    @abstractmethod
    def execute_dummy_batch(self) -> None:
        """Run every rank's MoE layers with no tokens: the step of a data-parallel replica with
        nothing scheduled while the others, whose experts it shares, run one."""

    # Whether the next step may be launched before this one's tokens are read: its decodes then
    # take their input tokens from the device, which only works where one rank samples and runs all.
    can_overlap_steps = False

    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> PendingStep:
        """Queue one step; its tokens are read when asked for. defer_sampling (executors that can
        overlap steps): the step samples once `PendingStep.sample` gives it its grammar masks.
        This default runs the step to the end."""
        assert not defer_sampling, f"{type(self).__name__} cannot overlap steps"
        return PendingStep(self.execute(scheduler_output))

    def shutdown(self) -> None:
        """Release the ranks; safe to call more than once."""
