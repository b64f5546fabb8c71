"""Per-request block tables on top of the block pool, with prefix-cache lookup and reuse."""

from __future__ import annotations

from collections.abc import Sequence

from pagoda.core.block_pool import BlockHash, BlockPool, hash_block_tokens
from pagoda.core.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.block_hashes: dict[str, list[BlockHash]] = {}  # hashes of each request's full blocks
        self.num_registered: dict[str, int] = {}  # how many of its blocks were offered to the cache
        self.prefix_cache_queries = 0  # in tokens, as vLLM counts them
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request's full blocks (no references taken yet).

        The last token is always left to compute: its logits are what the step samples from."""
        if not (self.enable_prefix_caching and request.use_prefix_cache):
            return [], 0
        hashes = self._full_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        num_cached = len(blocks) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_cached
        return blocks, num_cached

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Make room for the request's computed tokens, `computed_blocks` and `num_new_tokens` more.

        Returns False, changing nothing, when the pool is short."""
        table = self.block_tables.setdefault(request.request_id, [])
        num_cached = len(computed_blocks) * self.block_size
        total = request.num_computed_tokens + num_cached + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(table) - len(computed_blocks)
        # Hit blocks that sit in the free queue stop being free once touched.
        hits_in_free_queue = sum(1 for b in computed_blocks if self.block_pool.ref_counts[b] == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - hits_in_free_queue:
            if not table:
                del self.block_tables[request.request_id]
            return False
        self.block_pool.touch(computed_blocks)
        table.extend(computed_blocks)
        if num_new_blocks > 0:
            table.extend(self.block_pool.get_new_blocks(num_new_blocks))
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, table, total)
        return True

    def free(self, request: Request) -> None:
        # Tail blocks first: they reach the free queue (and eviction) before the shared head.
        table = self.block_tables.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(table))
        self.block_hashes.pop(request.request_id, None)
        self.num_registered.pop(request.request_id, None)

    def _full_block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended incrementally as tokens arrive."""
        hashes = self.block_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, request.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _cache_full_blocks(self, request: Request, table: list[int], num_tokens: int) -> None:
        hashes = self._full_block_hashes(request)
        start = self.num_registered.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(hashes))
        for i in range(start, end):
            self.block_pool.cache_block(table[i], hashes[i])
        self.num_registered[request.request_id] = max(start, end)
