"""The engine cores of data-parallel replicas whose MoE experts span them (--data-parallel-size
with --enable-expert-parallel) step in lockstep: every MoE layer brings all replicas' tokens
together, so while any replica has work each runs a step at the same time, one with nothing
scheduled a dummy step (ModelRunner.execute_dummy_batch).

Before each step the cores vote over a gloo group of their own (the engine core processes, apart
from the ranks' world, whose ranks may be worker processes): does any have unfinished requests,
and must any stop (told to, or orphaned), so that they also stop together. vLLM's DP coordinator
starts each such "wave" with a message to every engine; here a core with nothing to do waits up
to IDLE_WAIT_MS for input and then votes again, which is simpler and cannot miss a wake-up, at
the price of that much latency for a request reaching idle cores, and a vote every IDLE_WAIT_MS
while all are idle."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pagoda.config.groups import ParallelConfig

IDLE_WAIT_MS = 20


class ReplicaVote:
    def __init__(self, parallel: ParallelConfig) -> None:
        """Blocks until every replica's core has joined."""
        size = parallel.data_parallel_size
        store = dist.FileStore(str(Path(parallel.data_parallel_rendezvous) / "cores"), size)
        self._group = dist.ProcessGroupGloo(store, parallel.data_parallel_rank, size)

    def tally(self, busy: bool, stop: bool) -> tuple[bool, bool]:
        """(any core busy, any core stopping): the same answer on every core."""
        votes = torch.tensor([busy, stop], dtype=torch.int32)
        self._group.allreduce([votes]).wait()
        return bool(votes[0]), bool(votes[1])
