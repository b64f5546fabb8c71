"""The executor interface: what the engine asks of the ranks that hold the model.

The engine schedules once and hands each step's SchedulerOutput to its executor; the executor
gets it to every rank (in this process, to worker processes over pipes, or, in a multi-node
executor, to Ray actors) and returns the output of the rank that samples. Each rank holds its share
of the KV cache, all with the same number of blocks, so one block table serves every rank.

Every executor can overlap steps (the engine's asynchronous scheduling): `launch` queues a step
and returns at once, and its tokens are read later, after the next step has been launched
(`execute` runs a step read at once). The executors of worker ranks (RankExecutor) post a step to
every rank without waiting for its answer: a rank takes its calls in the order they were made
(pipes and a Ray actor's calls from one caller are ordered), so it queues step t+1 on its device
before it hands back step t's tokens. A launch made while the step before it is in flight goes
out with that step's collect, which the engine asks for right after: one message a step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

from pagoda.config.groups import ResolvedConfig
from pagoda.core.scheduler import SchedulerOutput
from pagoda.structured_output.bitmask import GrammarBitmask
from pagoda.worker.model_runner import ModelRunnerOutput
from pagoda.worker.step_codec import StepEncoder
from pagoda.worker.worker import KVBudget


class ExecutorDeadError(RuntimeError):
    """A rank failed or died: every rank has been stopped, and the engine cannot go on (its
    process ends, as vLLM's engine core does on an executor failure)."""


class LaunchedStep(Protocol):
    """A step queued on the ranks (model_runner.PendingStep in this process, RankStep on workers)."""

    @property
    def awaits_sampling(self) -> bool: ...

    def sample(self, grammar_bitmask: GrammarBitmask | None) -> None: ...

    def result(self) -> ModelRunnerOutput: ...


class Executor(ABC):
    @abstractmethod
    def num_kv_blocks_that_fit(self, budget: KVBudget) -> int:
        """The most KV blocks every rank has room for (the fewest over the ranks)."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Give every rank a KV cache of `num_blocks` blocks."""

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; its sampled tokens (one step at a time)."""
        return self.launch(scheduler_output).result()

    @abstractmethod
    def execute_dummy_batch(self) -> None:
        """Run every rank's MoE layers with no tokens: the step of a data-parallel replica with
        nothing scheduled while the others, whose experts it shares, run one."""

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> LaunchedStep:
        """Queue one step; its tokens are read when asked for. Steps are read in the order they
        were launched. The next step's decodes may take their input tokens from this step's
        samples before they are read (they stay on the device). defer_sampling: the step samples
        once `sample` gives it its grammar masks."""

    def shutdown(self) -> None:
        """Release the ranks; safe to call more than once."""


class RankExecutor(Executor):
    """An executor whose ranks are workers elsewhere (processes, Ray actors), each running
    worker.Worker and taking the executor's calls in the order they were made."""

    def __init__(self, config: ResolvedConfig) -> None:
        # TP rank 0 of the last pipeline stage samples (ModelRunner.samples).
        self._sampling_rank = config.parallel.world_size - config.parallel.tensor_parallel_size
        self._steps = StepEncoder()
        self._launched = 0  # steps launched so far: each one's number names it in its later calls
        self._uncollected: set[int] = set()  # launched steps whose tokens were not asked for
        # Launches made while the step before was uncollected: the engine asks for that step's
        # tokens next, and they go to the ranks in that call's message, ahead of it.
        self._held: list[tuple[str, tuple[Any, ...]]] = []

    @abstractmethod
    def _post(self, method: str, *args: Any) -> None:
        """Send a call to every rank without waiting: its answers are read by the next `_call`."""

    @abstractmethod
    def _call(self, method: str, *args: Any) -> list[Any]:
        """Send a call to every rank; every rank's answer to it, once the answers to the calls
        posted before it have come (the first failure among them stops every rank and raises
        ExecutorDeadError)."""

    def num_kv_blocks_that_fit(self, budget: KVBudget) -> int:
        return min(self._call("num_kv_blocks_that_fit", budget))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # One call, not a launch and a collect: a step read at once gains nothing from two.
        return self._ask("execute", self._steps.encode(scheduler_output))[self._sampling_rank]

    def execute_dummy_batch(self) -> None:
        self._ask("execute_dummy_batch")

    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> LaunchedStep:
        self._launched += 1
        number = self._launched
        call = ("launch", (number, self._steps.encode(scheduler_output), defer_sampling))
        if number - 1 in self._uncollected:  # one message a step, as one step at a time has
            self._held.append(call)
        else:
            self._post(call[0], *call[1])
        self._uncollected.add(number)
        return RankStep(self, number, defer_sampling)

    def _sample_step(self, number: int, grammar_bitmask: GrammarBitmask | None) -> None:
        self._flush_held()
        self._post("sample", number, grammar_bitmask)

    def _collect_step(self, number: int) -> ModelRunnerOutput:
        """The step's tokens; steps launched before it and not collected are dropped (as the
        ranks drop them: worker.Worker.collect)."""
        self._uncollected = {n for n in self._uncollected if n > number}
        return self._ask("collect", number)[self._sampling_rank]

    def _ask(self, method: str, *args: Any) -> list[Any]:
        """`_call`, with the launches held in its message, ahead of it."""
        if not self._held:
            return self._call(method, *args)
        calls, self._held = [*self._held, (method, args)], []
        return self._call("run_calls", calls)

    def _flush_held(self) -> None:
        if self._held:
            calls, self._held = self._held, []
            self._post("run_calls", calls)


class RankStep:
    """A step posted to the worker ranks: its masks (if deferred) and the read of its tokens are
    calls of their own, naming the step by its number (worker.Worker.collect)."""

    def __init__(self, executor: RankExecutor, number: int, defer_sampling: bool) -> None:
        self._executor = executor
        self._number = number
        self.awaits_sampling = defer_sampling

    def sample(self, grammar_bitmask: GrammarBitmask | None) -> None:
        assert self.awaits_sampling, "this step's sampling was not deferred"
        self.awaits_sampling = False
        self._executor._sample_step(self._number, grammar_bitmask)

    def result(self) -> ModelRunnerOutput:
        assert not self.awaits_sampling, "a deferred step is read before it sampled"
        return self._executor._collect_step(self._number)
