"""A long generation whose executor loses a rank mid-run: what the run ends with, within a bound."""

from __future__ import annotations

import threading
from collections.abc import Callable

from pagoda import LLM, SamplingParams
from pagoda.executor.base import ExecutorDeadError

LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)  # still running when a rank is killed
FAILURE_BOUND_S = 60  # the killed run must end by then; a hang fails the test instead of stalling it


def executor_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor


def run_until_killed(llm: LLM, prompts, kill: Callable[[], object]) -> ExecutorDeadError:
    """Start a long run, call kill() once it is decoding (five steps sent to the ranks), and
    return the ExecutorDeadError the run ended with (bounded: a run that hangs fails the test)."""
    executor = executor_of(llm)
    steps = threading.Semaphore(0)
    encode = executor._steps.encode

    def counted(scheduler_output):
        message = encode(scheduler_output)
        steps.release()
        return message

    executor._steps.encode = counted
    failure: list[BaseException] = []

    def run() -> None:
        try:
            llm.generate(prompts, LONG, use_tqdm=False)
        except BaseException as error:  # noqa: BLE001  (what the run ended with is the assertion)
            failure.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    for _ in range(5):  # the run is decoding
        assert steps.acquire(timeout=FAILURE_BOUND_S)
    kill()
    runner.join(FAILURE_BOUND_S)
    assert not runner.is_alive(), "the engine hung after a rank died"
    (error,) = failure
    assert isinstance(error, ExecutorDeadError), repr(error)
    return error
