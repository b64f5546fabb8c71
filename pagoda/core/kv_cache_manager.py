"""Per-request block tables on top of the block pool, with prefix-cache lookup and reuse."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from pagoda.core.block_pool import BlockPool, hash_block_tokens
from pagoda.core.request import Request
from pagoda.multimodal.inputs import block_extra_keys


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool, resident_blocks: int | None = None
    ) -> None:
        """resident_blocks: see BlockPool."""
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.block_pool = BlockPool(num_blocks, resident_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        # Per request, grown as its tokens arrive so that no prompt is hashed every step:
        # the hashes of its full blocks, and how many of its blocks were offered to the cache.
        self.block_hashes: dict[str, list[int]] = {}
        self.num_offered_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # in tokens, as vLLM counts them
        self.prefix_cache_hits = 0
        # A lookup counts once its request is admitted: the head of the queue, retried every step
        # while blocks are short, would otherwise count again each time.
        self._pending_lookups: dict[str, tuple[int, int]] = {}  # request id -> (tokens, hits)

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty when it holds none)."""
        return list(self.block_tables.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request's full blocks, and its length in tokens.

        Takes no references yet: `allocate_slots` does, once the request is sure to run."""
        if not (self.enable_prefix_caching and request.use_prefix_cache):
            return [], 0
        # The last token is always computed: its logits are what the step samples from.
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for block_hash in islice(self._full_block_hashes(request), max_blocks):
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        num_cached = len(blocks) * self.block_size
        self._pending_lookups[request.request_id] = (request.num_tokens, num_cached)
        return blocks, num_cached

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Make room for the request's computed tokens, `computed_blocks` and `num_new_tokens` more.

        Returns False, changing nothing, when the pool is short of free blocks."""
        table = self.block_tables.get(request.request_id)
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        if table is not None and not computed_blocks and num_tokens <= len(table) * self.block_size:
            # The common decode step: its token fits the last block. Only a block it fills is new
            # work for the prefix cache, or one whose last token was a placeholder until now.
            if self.enable_prefix_caching and num_tokens // self.block_size > self.num_offered_blocks.get(
                request.request_id, 0
            ):
                self._offer_full_blocks(request, table, num_tokens)
            return True
        table = [] if table is None else table
        pool = self.block_pool
        num_new_blocks = max(0, self.blocks_needed(num_tokens) - len(table) - len(computed_blocks))
        # A hit block waiting in the free queue stops being free once it is touched.
        num_free_hits = sum(1 for block_id in computed_blocks if pool.ref_counts[block_id] == 0)
        if num_new_blocks > pool.num_free_blocks - num_free_hits:
            return False
        if request.request_id not in self.block_tables:  # admitted: its lookup counts now
            queries, hits = self._pending_lookups.pop(request.request_id, (0, 0))
            self.prefix_cache_queries += queries
            self.prefix_cache_hits += hits
        pool.touch(computed_blocks)
        table.extend(computed_blocks)
        table.extend(pool.get_new_blocks(num_new_blocks, after=table[-1] if table else None))
        self.block_tables[request.request_id] = table
        if self.enable_prefix_caching:
            self._offer_full_blocks(request, table, num_tokens)
        return True

    def free(self, request: Request) -> None:
        # Tail blocks first: they reach the free queue, and so eviction, before a shared head.
        self.block_pool.free_blocks(reversed(self.block_tables.pop(request.request_id, [])))
        self.block_hashes.pop(request.request_id, None)
        self.num_offered_blocks.pop(request.request_id, None)
        self._pending_lookups.pop(request.request_id, None)

    def _full_block_hashes(self, request: Request) -> list[int]:
        hashes = self.block_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            tokens = request.token_ids[i * bs : (i + 1) * bs]
            # A block over image placeholders is keyed by the images' content too; the first by
            # the request's salt (the chain carries it on).
            extra = block_extra_keys(request.images, i * bs, (i + 1) * bs) if request.images else ()
            if i == 0 and request.cache_salt is not None:
                extra = (*extra, "salt:" + request.cache_salt)
            hashes.append(hash_block_tokens(parent, tokens, request.lora_int_id, extra))
        return hashes

    def _offer_full_blocks(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Cache the blocks this allocation fills whose tokens are all known (a placeholder's block
        waits for a later step). Their K/V is computed by the step being planned or an earlier one;
        a request that hits them in the same step is fine too, as attention writes the step's K/V
        before it reads the cache."""
        hashes = self._full_block_hashes(request)
        start = self.num_offered_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(hashes))
        for i in range(start, end):
            self.block_pool.cache_block(table[i], hashes[i])
        self.num_offered_blocks[request.request_id] = max(start, end)
