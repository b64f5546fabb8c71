"""Where this process sits in the grid of ranks: its tensor-parallel (TP) group and its
pipeline-parallel (PP) group, set once per process before the model is built.

Global rank = pp_rank * tp_size + tp_rank: the ranks of one pipeline stage are neighbours, so
that on one host a stage's TP group gets adjacent GPUs. A process that never calls
`init_parallel` is the single rank of a 1 x 1 grid, and every layer takes its unsharded path.

With expert parallelism the ranks of the expert-parallel (EP) group hold whole experts of each MoE
layer (their attention still split by heads) instead of a slice of every expert. The EP group is
the TP group, unless the experts span the data-parallel replicas (--data-parallel-size with
--enable-expert-parallel, as vLLM composes them): then one world holds every replica's ranks,
global rank = dp_rank * tp_size * pp_size + the rank within the replica, and the EP group is the
DP x TP ranks of a pipeline stage. The DP group (ranks of one stage and TP rank, one per replica)
then brings the replicas' tokens together in each MoE layer."""

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
_DP = GroupInfo(0, 1)
_EP = GroupInfo(0, 1)
_EXPERT_PARALLEL = False


def expert_parallel() -> bool:
    """Whether MoE layers place whole experts on the EP group's ranks (--enable-expert-parallel)."""
    return _EXPERT_PARALLEL


def tp_group() -> GroupInfo:
    return _TP


def pp_group() -> GroupInfo:
    return _PP


def dp_group() -> GroupInfo:
    """This rank's peers in the other data-parallel replicas (same stage, same TP rank); a group of
    one unless the experts span the replicas."""
    return _DP


def ep_group() -> GroupInfo:
    """The ranks whose shares of an MoE layer add up to the whole: the TP group, or the stage's
    DP x TP ranks when the experts span the replicas."""
    return _EP if _DP.size > 1 else _TP


def init_parallel(
    rank: int, tp_size: int, pp_size: int, init_method: str, backend: str, enable_expert_parallel: bool = False,
    dp_size: int = 1, dp_rank: int = 0,
) -> None:
    """Join the world of dp_size * tp_size * pp_size ranks (rank: within this replica) and build
    the TP and PP groups, and with several replicas the DP and EP groups."""
    global _TP, _PP, _DP, _EP, _EXPERT_PARALLEL
    _EXPERT_PARALLEL = enable_expert_parallel
    replica = tp_size * pp_size
    dist.init_process_group(
        backend, init_method=init_method, world_size=dp_size * replica, rank=dp_rank * replica + rank
    )

    def world(d: int, stage: int, t: int) -> int:
        return d * replica + stage * tp_size + t

    # new_group is collective over the whole world: every rank creates every group, in one order.
    for d in range(dp_size):
        for stage in range(pp_size):
            _TP = _member(tuple(world(d, stage, t) for t in range(tp_size)), _TP)
        for t in range(tp_size):
            _PP = _member(tuple(world(d, stage, t) for stage in range(pp_size)), _PP)
    if dp_size == 1:
        return
    for stage in range(pp_size):
        for t in range(tp_size):
            _DP = _member(tuple(world(d, stage, t) for d in range(dp_size)), _DP)
        _EP = _member(tuple(world(d, stage, t) for d in range(dp_size) for t in range(tp_size)), _EP)


def _member(ranks: tuple[int, ...], current: GroupInfo) -> GroupInfo:
    """The group of these world ranks if this rank is one of them, else `current`."""
    group = dist.new_group(list(ranks))
    me = dist.get_rank()
    if me not in ranks:
        return current
    return GroupInfo(ranks.index(me), len(ranks), group if len(ranks) > 1 else None, ranks)


def destroy_parallel() -> None:
    global _TP, _PP, _DP, _EP, _EXPERT_PARALLEL
    _EXPERT_PARALLEL = False
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = _PP = _DP = _EP = GroupInfo(0, 1)
