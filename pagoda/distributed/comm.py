"""What ranks exchange: all-reduce of row-parallel partial sums, all-gather of vocabulary-sharded
logits, the data-parallel replicas' token rows for the MoE layers whose experts span them, hidden
states from one pipeline stage to the next, and the sampling rank's tokens that the next step reads
before the engine has them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pagoda.distributed.parallel_state import GroupInfo, pp_group, tp_group


def all_reduce(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """Sum x over the group, in place."""
    dist.all_reduce(x, group=group.group)
    return x


def all_gather_last_dim(x: torch.Tensor, group: GroupInfo) -> torch.Tensor:
    """Each rank's x side by side along the last dimension, in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x, group=group.group)
    return torch.cat(parts, dim=-1)


def all_gather_rows(x: torch.Tensor, group: GroupInfo) -> tuple[torch.Tensor, slice]:
    """Every rank's rows of x, stacked in rank order, and where this rank's own rows are among
    them. Ranks may have different numbers of rows (none, too): each is padded to the most."""
    if group.size == 1:
        return x, slice(0, x.shape[0])
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(group.size)]
    dist.all_gather(counts, count, group=group.group)
    rows = [int(c) for c in counts]
    if not max(rows):  # every replica idle this step (nothing to exchange)
        return x, slice(0, 0)
    padded = x.new_zeros((max(rows), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(group.size)]
    dist.all_gather(parts, padded, group=group.group)
    start = sum(rows[: group.rank])
    return torch.cat([part[:n] for part, n in zip(parts, rows)]), slice(start, start + x.shape[0])


def send_to_next_stage(tensors: tuple[torch.Tensor, ...], stage: GroupInfo) -> None:
    peer = stage.global_ranks[stage.rank + 1]
    for t in tensors:
        dist.send(t.contiguous(), dst=peer)


def recv_from_prev_stage(
    count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, stage: GroupInfo
) -> tuple[torch.Tensor, ...]:
    """`count` tensors of one shape, in the order the previous stage sent them."""
    peer = stage.global_ranks[stage.rank - 1]
    out = tuple(torch.empty(shape, dtype=dtype, device=device) for _ in range(count))
    for t in out:
        dist.recv(t, src=peer)
    return out


def broadcast_from_sampling_rank(x: torch.Tensor) -> torch.Tensor:
    """The sampling rank's x (TP rank 0 of the last pipeline stage), on every rank, in place: to
    each stage's TP rank 0 over their PP group, then over each stage's TP group. Within this
    engine's groups, not the world's, which may span data-parallel replicas that step apart."""
    pp, tp = pp_group(), tp_group()
    if pp.group is not None and tp.rank == 0:
        dist.broadcast(x, src=pp.global_ranks[-1], group=pp.group)
    if tp.group is not None:
        dist.broadcast(x, src=tp.global_ranks[0], group=tp.group)
    return x
