"""One rank of the model: its ModelRunner (its shard of the weights and of the KV cache), and the
loop a worker process runs, taking calls from the engine over a pipe.

The engine process never holds a shard when there are several ranks: every rank is a worker
process of its own, so all ranks are alike and the engine only schedules. A worker may be forked
from the engine's process (see executor.multiproc), so it runs its rank on a thread of its own.
A step is one call (execute) when the engine reads it at once. Overlapped, it is a launch, a
collect and, for a step whose grammar masks follow the step before, a sample (executor.base.RankStep);
a launch travels in one message with the collect of the step before it (run_calls), so that a
rank queues the next step on its device before it hands back this one's tokens."""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from pagoda.child_signals import leave_shutdown_to_the_front_end
from pagoda.config.groups import ParallelConfig, ResolvedConfig
from pagoda.distributed.parallel_state import destroy_parallel, init_parallel
from pagoda.exit_now import exit_now
from pagoda.structured_output.bitmask import GrammarBitmask
from pagoda.worker.model_runner import ModelRunner, ModelRunnerOutput, PendingStep
from pagoda.worker.step_codec import StepDecoder, StepMessage


@dataclass
class KVBudget:
    """What bounds the KV pool: a stated budget (always on the CPU), or a share of the GPU's memory
    less the weights and the activations of the largest step."""

    stated_bytes: int | None
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_model_len: int
    # A draft model's bytes per block: its pool takes as many blocks as the target's from the same
    # budget (every rank leaves it room, though only the first rank's device holds it).
    draft_bytes_per_block: int = 0


class Worker:
    def __init__(self, config: ResolvedConfig, rank: int = 0) -> None:
        self.runner = ModelRunner(config, config.rank_device(rank))
        self.steps = StepDecoder()
        self.in_flight: deque[tuple[int, PendingStep]] = deque()  # (number, step): launched, not collected

    def num_kv_blocks_that_fit(self, budget: KVBudget) -> int:
        """How many KV blocks of this rank's share fit its memory."""
        runner = self.runner
        per_block = runner.kv_bytes_per_block() + budget.draft_bytes_per_block
        if per_block == 0:
            # An encoder-only model keeps no KV cache (layers/encoder_attention.py): its blocks are
            # the scheduler's bookkeeping alone, and the engine core caps how many it counts.
            return sys.maxsize
        if budget.stated_bytes is not None:
            available = budget.stated_bytes
        else:
            available = runner.profile_free_gpu_bytes(
                budget.gpu_memory_utilization, budget.max_num_batched_tokens, budget.max_model_len
            )
        return max(0, available) // per_block

    def allocate_kv_cache(self, num_blocks: int) -> int:
        """Allocate the pool; its bytes."""
        self.runner.allocate_kv_cache(num_blocks)
        return num_blocks * self.runner.kv_bytes_per_block()

    def execute(self, message: StepMessage) -> ModelRunnerOutput | None:
        """A step read at once: its sampled tokens from the rank that samples; None from the others."""
        out = self.runner.launch(self.steps.decode(message)).result()
        return out if self.runner.samples else None

    def execute_dummy_batch(self) -> None:
        self.runner.execute_dummy_batch()

    # An overlapped step's calls (executor.base.RankStep), each naming the step by its number.

    def launch(self, number: int, message: StepMessage, defer_sampling: bool) -> None:
        """Queue the step on this rank's device; its tokens wait for `collect`."""
        self.in_flight.append((number, self.runner.launch(self.steps.decode(message), defer_sampling)))

    def sample(self, number: int, grammar_bitmask: GrammarBitmask | None) -> None:
        """Sample the step (the newest), deferred until its masks came (only the rank that samples
        deferred anything)."""
        newest, step = self.in_flight[-1]
        assert newest == number, f"masks for step {number}, but step {newest} is the newest"
        if step.awaits_sampling:
            step.sample(grammar_bitmask)

    def collect(self, number: int) -> ModelRunnerOutput | None:
        """The step's sampled tokens from the rank that samples; None from the others. Steps
        launched before it and not collected were dropped by the engine (a step that failed
        after the next one was launched): nobody will read them."""
        oldest, step = self.in_flight.popleft()
        while oldest != number:
            oldest, step = self.in_flight.popleft()
        return step.result() if self.runner.samples else None

    def run_calls(self, calls: list[tuple[str, tuple]]) -> Any:
        """Several calls that came in one message (the launch of a step, then the collect of the
        one before it), in order; the last one's answer."""
        answer = None
        for method, args in calls:
            answer = getattr(self, method)(*args)
        return answer


def cpu_threads_per_rank(world_size: int) -> int:
    """Each CPU rank's share of the host's cores: one thread pool each would oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // world_size)


def run_worker(config: ResolvedConfig, rank: int, init_method: str, conn: Connection) -> None:
    """A worker process's main: run the rank on a new thread, then end the process at once.

    A new thread, because GNU OpenMP keeps its thread pool (torch's intra-op threads) per calling
    thread: a child forked after the engine's process ran a parallel region inherits that pool
    without its threads, and the forking thread's next parallel region would wait for them forever."""
    # The engine owns shutdown: a rank keeps serving until the engine tells it to stop (or its
    # end of the pipe closes), though Ctrl-C or systemd's SIGTERM reached it too.
    leave_shutdown_to_the_front_end()
    finished: list[None] = []  # stays empty if the rank raised (its thread printed the traceback)
    rank_thread = threading.Thread(
        target=lambda: finished.append(_run_rank(config, rank, init_method, conn)), name=f"pagoda-rank-{rank}"
    )
    rank_thread.start()
    rank_thread.join()
    exit_now(0 if finished else 1)


def _run_rank(config: ResolvedConfig, rank: int, init_method: str, conn: Connection) -> None:
    """Join the group, build this rank's shard, then serve calls (method name, args) until told
    to stop or the engine's end of the pipe closes."""
    try:
        set_up_rank(config, rank, init_method)
        worker = Worker(config, rank)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        _serve(worker, conn)
    finally:
        destroy_parallel()


def set_up_rank(config: ResolvedConfig, rank: int, init_method: str) -> None:
    """Bind this process to its rank's device and join the process groups (NCCL on GPUs, gloo on CPUs)."""
    device = config.rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads_per_rank(config.parallel.world_size))
    join_process_groups(config, rank, init_method)


def join_process_groups(config: ResolvedConfig, rank: int, init_method: str) -> None:
    """rank: within this data-parallel replica; the world spans every replica when the experts do."""
    backend = "nccl" if config.rank_device(rank).type == "cuda" else "gloo"
    parallel = config.parallel
    dp_size = parallel.data_parallel_size if parallel.experts_span_replicas else 1
    init_parallel(
        rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size, init_method, backend,
        parallel.enable_expert_parallel, dp_size, parallel.data_parallel_rank,
    )


def replicas_init_method(parallel: ParallelConfig) -> str:
    """Where the ranks of every data-parallel replica meet when the experts span the replicas."""
    return (Path(parallel.data_parallel_rendezvous) / "ranks").as_uri()


def _serve(worker: Worker, conn: Connection) -> None:
    try:
        while True:
            method, args = conn.recv()
            if method == "shutdown":
                return
            try:
                reply = ("ok", getattr(worker, method)(*args))
            except Exception:
                reply = ("error", traceback.format_exc())
            conn.send(reply)
    except (EOFError, OSError):  # the engine is gone (its pipe closed or reset): nobody will call again
        return
