"""The KV block pool's bookkeeping: free list, reference counts and the prefix cache (no tensors here).

Blocks are ``block_size``-token pages of the KV cache (:class:`~moekit.engine.kv_cache.PagedKVCache`
holds the tensors). A request owns a list of blocks (its block table). Block 0 is never handed
out: it is the scratch page that padding rows of a fixed-shape step write to.

Prefix caching: once a block is full, it is registered under a hash of its tokens and of every
token before it (a chain: ``hash(parent hash, tokens)``), so equal hashes mean equal prefixes.
A new request walks its prompt's full blocks and takes every block already cached, sharing it
(the reference count grows). A block whose count falls to zero keeps its contents and hash and
joins an LRU list; it is reused by a later request with the same prefix, or evicted (its hash
dropped) when a fresh block is needed and the free list is empty.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from moekit.errors import MoekitError


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The key of a full block: SHA-256 over the parent block's key and this block's token ids."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    """Block ids 1 .. num_blocks - 1 for requests; ``allocate`` / ``share`` / ``release`` move them."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise MoekitError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))  # popped from the end: low ids first
        self.cached: dict[bytes, int] = {}  # full-block key -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody references, oldest first
        self.hits = self.queries = 0  # prefix-cache statistics, in blocks

    def available(self) -> int:
        """Blocks a request could get now (free, or cached but unreferenced)."""
        return len(self.free) + len(self.lru)

    def in_use(self) -> int:
        """Blocks some request references."""
        return self.num_blocks - 1 - self.available()

    def allocate(self) -> int:
        """A fresh block (reference count 1); the least recently used cached block if none is free."""
        if self.free:
            b = self.free.pop()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.cached[self.key[b]]
            self.key[b] = None
        else:
            raise MoekitError("KV cache: no block left (the scheduler should have waited or preempted)")
        self.refs[b] = 1
        return b

    def share(self, b: int) -> None:
        """One more request uses cached block ``b``."""
        if self.refs[b] == 0:
            del self.lru[b]
        self.refs[b] += 1

    def release(self, b: int) -> None:
        """One request fewer uses block ``b``; at zero it is cached (LRU) if it has a key, else free."""
        self.refs[b] -= 1
        if self.refs[b] < 0:
            raise MoekitError(f"KV cache: block {b} released more often than taken")
        if self.refs[b] == 0:
            if self.key[b] is not None:
                self.lru[b] = None
            else:
                self.free.append(b)

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key) if self.prefix_caching else None

    def register(self, b: int, key: bytes) -> None:
        """Block ``b`` is full and holds the tokens ``key`` names (a duplicate of a cached block stays unkeyed)."""
        if self.prefix_caching and self.key[b] is None and key not in self.cached:
            self.key[b] = key
            self.cached[key] = b

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody uses (e.g. after the weights change)."""
        while self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.cached[self.key[b]]
            self.key[b] = None
            self.free.append(b)
