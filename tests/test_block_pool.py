"""BlockPool: ref counts, the LRU free queue, the prefix-cache map, and chained block hashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.core.block_pool import BlockPool, hash_block_tokens


def check_invariants(pool: BlockPool) -> None:
    assert all(ref >= 0 for ref in pool.ref_counts)
    never_used = set(range(pool.num_used, pool.num_blocks))
    assert set(pool.free_queue) | never_used == {b for b, ref in enumerate(pool.ref_counts) if ref == 0}
    assert not never_used & set(pool.free_queue)
    assert pool.cached == {h: b for b, h in enumerate(pool.block_hashes) if h is not None}
    assert pool.usage == pytest.approx(1 - pool.num_free_blocks / pool.num_blocks)


def test_hash_is_deterministic_and_chained():
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, (1, 2))
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    head_a, head_b = hash_block_tokens(None, [1, 2]), hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(head_a, [5, 6]) != hash_block_tokens(head_b, [5, 6])
    assert hash_block_tokens(head_a, [5, 6]) != hash_block_tokens(None, [5, 6])


def test_new_blocks_come_from_the_front_with_one_reference():
    pool = BlockPool(4)
    assert pool.get_new_blocks(3) == [0, 1, 2]
    assert pool.ref_counts == [1, 1, 1, 0]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    check_invariants(pool)


def test_freed_blocks_are_reused_least_recently_freed_first():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for block_id in blocks:  # cached: each one taken evicts what it holds, the oldest first
        pool.cache_block(block_id, 100 + block_id)
    pool.free_blocks([blocks[2], blocks[0], blocks[3], blocks[1]])
    assert pool.get_new_blocks(4) == [blocks[2], blocks[0], blocks[3], blocks[1]]


def test_new_blocks_follow_the_block_before_them_where_that_evicts_nothing():
    pool = BlockPool(8)
    a = pool.get_new_blocks(6)
    pool.cache_block(a[4], 444)
    pool.free_blocks([a[1], a[5], a[2], a[4]])  # 2 and 5 free and uncached, 4 cached
    # After block 1 (a cached history's last block, say): 2 is free and holds nothing, then 3 is
    # held, so the least recently freed block; never-used ones come first while the pool grows.
    assert pool.get_new_blocks(3, after=1) == [2, 6, 7]
    assert pool.get_new_blocks(1, after=3) == [1]  # 4 is free but cached: not taken out of turn
    assert pool.get_cached_block(444) == 4
    assert pool.get_new_blocks(2) == [5, 4]  # a call's blocks follow each other too
    check_invariants(pool)


def test_a_freed_cached_block_can_be_hit_until_it_is_evicted():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 111)
    pool.cache_block(b, 222)
    pool.free_blocks([a, b])
    assert pool.get_cached_block(111) == a
    pool.touch([a])  # a hit takes it out of the free queue
    assert pool.ref_counts[a] == 1 and a not in pool.free_queue
    assert pool.get_new_blocks(1) == [b]  # the only free block: its cached content is evicted
    assert pool.get_cached_block(222) is None
    assert pool.get_cached_block(111) == a
    check_invariants(pool)


def test_reset_forgets_every_cached_block_once_none_is_held():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 111)
    pool.cache_block(b, 222)
    pool.free_blocks([b])
    assert pool.reset_prefix_cache() is False and pool.get_cached_block(222) == b  # a is held
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(111) is None and pool.get_cached_block(222) is None
    check_invariants(pool)


def test_touch_adds_a_reference_to_a_held_block():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.touch([a])
    pool.free_blocks([a])
    assert pool.ref_counts[a] == 1 and a not in pool.free_queue
    pool.free_blocks([a])
    assert a in pool.free_queue


def test_freeing_a_free_block_raises():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(ValueError):
        pool.free_blocks([a])
    assert pool.ref_counts[a] == 0


def test_the_same_content_is_cached_once():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 7)
    pool.cache_block(b, 7)
    pool.cache_block(a, 8)  # a block keeps the hash it was cached under
    assert pool.cached == {7: a}
    assert pool.block_hashes == [7, None]


def test_past_its_resident_blocks_the_pool_reuses_freed_blocks_first():
    # A CPU pool's pages are resident once written: past resident_blocks, blocks are reused (least
    # recently freed first) and never-used ones are taken only when no freed one is left.
    pool = BlockPool(6, resident_blocks=3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, 1)
    pool.free_blocks([b, a])
    assert pool.get_new_blocks(1) == [b]  # not block 3
    assert pool.get_cached_block(1) == a  # still cached: b was freed first
    assert pool.get_new_blocks(3) == [a, 3, 4]  # a evicted, then new blocks as none is free
    assert pool.get_cached_block(1) is None and pool.num_used == 5
    check_invariants(pool)
    gpu = BlockPool(6)  # no bound: never-used blocks first, as a GPU's pool, allocated whole
    x, y = gpu.get_new_blocks(2)
    gpu.free_blocks([x, y])
    assert gpu.get_new_blocks(5) == [2, 3, 4, 5, x]


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)


# Random operations against a minimal model of the pool: who holds what, and the LRU order.

_op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 3)),
    st.tuples(st.just("free"), st.integers(0, 1000)),
    st.tuples(st.just("touch"), st.integers(0, 1000)),
    st.tuples(st.just("cache"), st.integers(0, 1000), st.integers(0, 5)),
)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 6), ops=st.lists(_op, max_size=40))
def test_random_operations_keep_the_pool_consistent(num_blocks, ops):
    pool = BlockPool(num_blocks)
    held: list[int] = []  # one entry per reference taken
    lru: list[int] = list(range(num_blocks))  # the free queue, oldest first
    for op in ops:
        if op[0] == "alloc" and op[1] <= len(lru):
            expected, lru = lru[: op[1]], lru[op[1] :]
            assert pool.get_new_blocks(op[1]) == expected
            held += expected
        elif op[0] == "free" and held:
            block = held.pop(op[1] % len(held))
            pool.free_blocks([block])
            if block not in held:
                lru.append(block)
        elif op[0] == "touch" and pool.cached:
            block = pool.get_cached_block(sorted(pool.cached)[op[1] % len(pool.cached)])
            pool.touch([block])
            if block in lru:
                lru.remove(block)
            held.append(block)
        elif op[0] == "cache" and held:
            pool.cache_block(held[op[1] % len(held)], op[2])
        check_invariants(pool)
        assert [*range(pool.num_used, num_blocks), *pool.free_queue] == lru
        assert pool.ref_counts == [held.count(b) for b in range(num_blocks)]
    pool.free_blocks(held)
    assert pool.num_free_blocks == num_blocks and pool.usage == 0
