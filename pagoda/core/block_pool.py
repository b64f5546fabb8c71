"""The pool of fixed-size KV blocks: ref counts, an LRU free queue, and the prefix-cache map.

A block whose ref count drops to zero goes to the end of the free queue but keeps its cached
hash, so a later request with the same prefix can still take it back; allocation takes from the
front, evicting the least recently freed cached block first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

BlockHash = Hashable


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The key of a full block: its tokens chained to everything before it.

    The key is the (parent key's hash, tokens) tuple itself rather than a bare int, so a dict
    lookup compares the block's own tokens exactly; only the parent is matched by its 64-bit hash.
    (Nesting the parent key itself would make every hash walk the whole prefix.)"""
    return (hash(parent_hash), tuple(token_ids))


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        # OrderedDict as an O(1) queue that also supports removal from the middle (cache hits).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def get_new_blocks(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise ValueError(f"asked for {n} blocks with only {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop a reference; blocks nobody holds go to the back of the free queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} is freed but nobody holds it")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        if self.block_hashes[block_id] is not None or block_hash in self.cached:
            return  # already cached, or the same content lives in another block
        self.block_hashes[block_id] = block_hash
        self.cached[block_hash] = block_id

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hashes[block_id] = None
