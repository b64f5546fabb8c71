"""Where this process sits in the grid of ranks: its tensor-parallel (TP) group and its
pipeline-parallel (PP) group, set once per process before the model is built.

Global rank = pp_rank * tp_size + tp_rank: the ranks of one pipeline stage are neighbours, so
that on one host a stage's TP group gets adjacent GPUs. A process that never calls
`init_parallel` is the single rank of a 1 x 1 grid, and every layer takes its unsharded path.

With expert parallelism the ranks of a TP group hold whole experts of each MoE layer (their
attention still split by heads) instead of a slice of every expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class GroupInfo:
    rank: int  # within the group
    size: int
    group: dist.ProcessGroup | None = None  # None when size == 1: nothing to talk to
    global_ranks: tuple[int, ...] = (0,)  # the world rank of each member, by group rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


_TP = GroupInfo(0, 1)
_PP = GroupInfo(0, 1)
_EXPERT_PARALLEL = False


def expert_parallel() -> bool:
    """Whether MoE layers place whole experts on the TP group's ranks (--enable-expert-parallel)."""
    return _EXPERT_PARALLEL


def tp_group() -> GroupInfo:
    return _TP


def pp_group() -> GroupInfo:
    return _PP


def init_parallel(
    rank: int, tp_size: int, pp_size: int, init_method: str, backend: str, enable_expert_parallel: bool = False
) -> None:
    """Join the world of tp_size * pp_size ranks and build the TP and PP groups."""
    global _TP, _PP, _EXPERT_PARALLEL
    _EXPERT_PARALLEL = enable_expert_parallel
    dist.init_process_group(backend, init_method=init_method, world_size=tp_size * pp_size, rank=rank)
    pp_rank, tp_rank = divmod(rank, tp_size)
    # new_group is collective over the whole world: every rank creates every group, in one order.
    for stage in range(pp_size):
        ranks = tuple(stage * tp_size + t for t in range(tp_size))
        group = dist.new_group(list(ranks))
        if stage == pp_rank:
            _TP = GroupInfo(tp_rank, tp_size, group if tp_size > 1 else None, ranks)
    for t in range(tp_size):
        ranks = tuple(stage * tp_size + t for stage in range(pp_size))
        group = dist.new_group(list(ranks))
        if t == tp_rank:
            _PP = GroupInfo(pp_rank, pp_size, group if pp_size > 1 else None, ranks)


def destroy_parallel() -> None:
    global _TP, _PP, _EXPERT_PARALLEL
    _EXPERT_PARALLEL = False
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP, _PP = GroupInfo(0, 1), GroupInfo(0, 1)
