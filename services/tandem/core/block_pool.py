"""KV block ids: who holds each block, and which blocks hold a known prefix (the coordinator's
scheduler; core.pipeline uses it without prefix caching).

Every block has a reference count: the requests whose block tables name it. With prefix
caching, a full block whose keys and values every stage has computed is published under a hash
chained over the token ids of every full block from the start of the sequence up to it, so the
hash names the whole prefix, not only the block's own tokens. A later request whose prompt
begins with the same full blocks matches them and takes a reference instead of computing them
again. A published block that no request holds stays cached until an allocation needs it;
the least recently released goes first.

Stages know nothing of this: they write and read blocks by id, in step order, so a block
published after the step that wrote it completed is safe for any later step to read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from tandem.core.errors import ResourceExhaustedError


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # never held and holding nothing cached
        self._refs = [0] * num_blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block
        self._hash_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (its prefix hash, its tokens)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds, oldest first
        self.num_queried_tokens = 0  # prompt tokens looked up in the cache
        self.num_hit_tokens = 0  # of those, found there

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used, or cached and held by no request."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """`num_blocks` blocks with nothing in them, each held once; cached blocks nobody holds
        are given up, oldest first, when no free one is left."""
        if not self.can_allocate(num_blocks):
            raise ResourceExhaustedError(f"need {num_blocks} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                prefix_hash, _ = self._hash_of.pop(block)
                del self._cached[prefix_hash]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds is free again, or stays cached."""
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def forget_cached(self) -> None:
        """Drop every published prefix (a stage lost its KV cache); blocks nobody holds are free."""
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks that hold the longest run of full blocks `token_ids` begins with,
        each now held once more by the caller. Counts the lookup in the hit statistics."""
        if not self.prefix_caching:
            return []
        blocks, parent = [], 0
        bs = self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            tokens = tuple(token_ids[start:start + bs])
            parent = hash((parent, tokens))
            block = self._cached.get(parent)
            if block is None or self._hash_of[block][1] != tokens:
                break
            blocks.append(block)
        for block in blocks:
            self._refs[block] += 1
            self._evictable.pop(block, None)
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(blocks) * bs
        return blocks

    def unmatch(self, blocks: Sequence[int], num_queried: int) -> None:
        """Undo a `match` that found `blocks` for `num_queried` tokens: the references are given
        back and the lookup leaves the hit statistics (its request was not admitted after all)."""
        self.free(blocks)
        if self.prefix_caching:  # without it, `match` counted nothing
            self.num_queried_tokens -= num_queried
            self.num_hit_tokens -= len(blocks) * self.block_size

    def publish(self, block_table: Sequence[int], token_ids: Sequence[int], num_computed: int) -> None:
        """Publish the full blocks of `block_table` among the first `num_computed` tokens of
        `token_ids`, whose keys and values are computed on every stage. A prefix already cached
        under another block keeps that block."""
        if not self.prefix_caching:
            return
        parent, bs = 0, self.block_size
        for i in range(min(num_computed // bs, len(block_table))):
            block, tokens = block_table[i], tuple(token_ids[i * bs:(i + 1) * bs])
            known = self._hash_of.get(block)
            if known is not None and known[1] == tokens:
                parent = known[0]
                continue
            parent = hash((parent, tokens))
            if parent not in self._cached and known is None:
                self._cached[parent] = block
                self._hash_of[block] = (parent, tokens)
