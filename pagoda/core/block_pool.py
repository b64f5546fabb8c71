"""The pool of fixed-size KV blocks: ref counts, an LRU free queue, and the prefix-cache map.

A block whose ref count drops to zero goes to the end of the free queue but keeps its cached
hash, so a later request with the same prefix can still take it back; allocation takes blocks
never used before first, then from the front of the queue, evicting the least recently freed
cached block first. A pool whose memory is only resident once written (the CPU's) can bound that:
once `resident_blocks` have been used, freed blocks are taken before never-used ones, so the
written part grows only when more blocks are held at once, and the prefix cache keeps what fits
in it. Among free blocks that cache nothing, the one right after a request's last block comes
first (get_new_blocks' `after`), so that a request's blocks run in order where they can."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

_HASH_BYTES = 32


def hash_block_tokens(
    parent_hash: int | None, token_ids: Sequence[int], lora_int_id: int = 0, extra_keys: Sequence[str] = ()
) -> int:
    """The key of a full block: a digest of its parent block's key, its own tokens, the LoRA
    adapter that computed it (0: none), as the same tokens have other K/V under another adapter,
    and extra keys (the content hashes of the images whose placeholders it holds).

    BLAKE2b rather than Python's hash(): hash() of int tuples can be collided on purpose, and the
    map is keyed by this digest alone, so a collision would hand a request another prompt's KV.
    Chaining makes one key stand for the whole prefix up to and including this block. extra_keys:
    what else the block's K/V depends on (the digests of the images behind its placeholder tokens),
    or who may share it (a request's cache salt, on its first block)."""
    digest = hashlib.blake2b(digest_size=_HASH_BYTES)
    if parent_hash is not None:
        digest.update(parent_hash.to_bytes(_HASH_BYTES, "little"))
    digest.update(array("q", token_ids).tobytes())
    if lora_int_id:
        digest.update(b"lora" + lora_int_id.to_bytes(8, "little"))
    for key in extra_keys:
        digest.update(key.encode())
    return int.from_bytes(digest.digest(), "little")


class BlockPool:
    def __init__(self, num_blocks: int, resident_blocks: int | None = None) -> None:
        """resident_blocks: how many blocks are used before freed ones are preferred to never-used
        ones (module docstring); None: never-used blocks first while any are left."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        # Blocks [0, num_used) have been handed out at some time; the rest never have.
        self.num_used = 0
        self.resident_blocks = num_blocks if resident_blocks is None else max(1, min(resident_blocks, num_blocks))
        # The freed blocks, least recently freed first. An OrderedDict is an O(1) queue that also
        # supports removal from the middle (cache hits).
        self.free_queue: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue) + self.num_blocks - self.num_used

    @property
    def usage(self) -> float:
        """The fraction of blocks some request holds."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, n: int, after: int | None = None) -> list[int]:
        """Take `n` blocks (never-used or least recently freed: module docstring), forgetting
        what they cached. after: the block they follow in their request's table; each new block
        is the one right after the previous where that one is free and caches nothing (taking it
        evicts nothing), so a request's blocks run in order where they can: the CPU's attention
        reads such a run in place (attention/torch_backend.py, block_run). A chat's next turn,
        for one, follows its cached history with the block its last turn left half full."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks with only {self.num_free_blocks} free")
        blocks: list[int] = []
        for _ in range(n):
            blocks.append(self._take(None if after is None else after + 1))
            after = blocks[-1]
        for block_id in blocks:
            self._evict(block_id)
            self.ref_counts[block_id] = 1
        return blocks

    def _take(self, preferred: int | None) -> int:
        if preferred in self.free_queue and self.block_hashes[preferred] is None:
            del self.free_queue[preferred]
            return preferred
        if self.num_used < self.num_blocks and (self.num_used < self.resident_blocks or not self.free_queue):
            self.num_used += 1
            return self.num_used - 1
        return self.free_queue.popitem(last=False)[0]

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop a reference; blocks nobody holds go to the back of the free queue, still cached."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is freed but nobody holds it")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Offer a full, computed block to the prefix cache."""
        if self.block_hashes[block_id] is not None or block_hash in self.cached:
            return  # already cached, or the same content already lives in another block
        self.block_hashes[block_id] = block_hash
        self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache: a benchmark's cold start, or new
        weights); False, forgetting nothing, while any block is held."""
        if any(self.ref_counts):
            return False
        self.cached.clear()
        self.block_hashes = [None] * self.num_blocks
        return True

    def get_cached_block(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hashes[block_id] = None
