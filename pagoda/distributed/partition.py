"""How a model is cut across ranks: attention heads across TP ranks, layers across PP stages."""

from __future__ import annotations


def kv_head_shard(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(first KV head, count) that a TP rank holds.

    With at least as many KV heads as ranks each rank holds its share; with fewer, each KV head
    is replicated on tp_size / num_kv_heads neighbouring ranks, the ones whose query heads use it.
    """
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide the model's {num_kv_heads} KV heads "
                "(num_key_value_heads), or be a multiple of it"
            )
        count = num_kv_heads // tp_size
        return tp_rank * count, count
    if tp_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must be a multiple of the model's {num_kv_heads} KV heads "
            "(num_key_value_heads) when it is larger"
        )
    return tp_rank * num_kv_heads // tp_size, 1


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The decoder layers of one pipeline stage: contiguous, as even as they divide."""
    return range(pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size)
