"""The coordinator's block pool: reference counts, prefix matching, eviction, hit statistics."""

from __future__ import annotations

import pytest

from tandem.core.block_pool import BlockPool
from tandem.core.errors import ResourceExhaustedError

BS = 4


def prompt(*blocks: int, tail: int = 0) -> list[int]:
    """Token ids: one full block of `b`s per argument, then `tail` more tokens."""
    return [t for b in blocks for t in [b] * BS] + [99] * tail


def test_allocate_and_free_without_caching():
    pool = BlockPool(4, BS, prefix_caching=False)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(ResourceExhaustedError, match="need 2 KV blocks, 1 free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 4
    pool.publish(a, prompt(1, 2, 3), 12)
    assert pool.match(prompt(1, 2, 3)) == [] and pool.num_cached == 0


def test_a_published_prefix_is_matched_and_shared():
    pool = BlockPool(8, BS)
    tokens = prompt(1, 2, 3, tail=2)
    table = pool.allocate(4)
    pool.publish(table, tokens, num_computed=len(tokens))  # three full blocks; the fourth is partial
    assert pool.num_cached == 3
    # A prompt sharing the first two blocks, then differing: two blocks reused, held twice now.
    hit = pool.match(prompt(1, 2, 7))
    assert hit == table[:2]
    pool.free(table)  # the first request ends: the shared blocks stay held by the second
    assert pool.num_free == 8 - 2
    pool.free(hit)
    assert pool.num_free == 8 and pool.num_cached == 3  # free to take, still cached
    assert (pool.num_queried_tokens, pool.num_hit_tokens) == (12, 8)


def test_the_hash_names_the_whole_prefix_not_one_block():
    pool = BlockPool(8, BS)
    table = pool.allocate(2)
    pool.publish(table, prompt(1, 2), 8)
    assert pool.match(prompt(2)) == []  # block "2" cached only after block "1"
    assert pool.match(prompt(1, 2)) == table
    assert pool.match(prompt(1, 2, tail=3)) == table  # a partial last block is not matched


def test_only_computed_blocks_are_published():
    pool = BlockPool(8, BS)
    table = pool.allocate(3)
    pool.publish(table, prompt(1, 2, 3), num_computed=7)
    assert pool.num_cached == 1
    pool.publish(table, prompt(1, 2, 3), num_computed=12)  # later steps fill the rest
    assert pool.num_cached == 3 and pool.match(prompt(1, 2, 3)) == table


def test_a_prefix_computed_twice_keeps_its_first_block():
    pool = BlockPool(8, BS)
    first, second = pool.allocate(2), pool.allocate(2)  # two requests computed it side by side
    pool.publish(first, prompt(1, 2), 8)
    pool.publish(second, prompt(1, 2), 8)
    assert pool.num_cached == 2
    pool.free(second)
    assert pool.num_free == 8 - 2  # the duplicates were plain blocks: free at once
    assert pool.match(prompt(1, 2)) == first


def test_cached_blocks_nobody_holds_are_evicted_oldest_first():
    pool = BlockPool(4, BS)
    a, b = pool.allocate(2), pool.allocate(2)
    pool.publish(a, prompt(1, 2), 8)
    pool.publish(b, prompt(5, 6), 8)
    pool.free(a)  # released first: evicted first
    pool.free(b)
    assert pool.num_free == 4 and pool.num_cached == 4
    taken = pool.allocate(2)
    assert sorted(taken) == sorted(a) and pool.num_cached == 2
    assert pool.match(prompt(1, 2)) == []  # gone with its blocks
    assert pool.match(prompt(5, 6)) == b


def test_a_matched_block_is_not_evictable_while_held():
    pool = BlockPool(2, BS)
    a = pool.allocate(2)
    pool.publish(a, prompt(1, 2), 8)
    pool.free(a)
    hit = pool.match(prompt(1))
    assert hit == a[:1] and pool.num_free == 1
    assert pool.allocate(1) == a[1:]  # the one not held
    with pytest.raises(ResourceExhaustedError):
        pool.allocate(1)


def test_a_recycled_block_is_published_again_under_its_new_prefix():
    pool = BlockPool(1, BS)
    (block,) = pool.allocate(1)
    pool.publish([block], prompt(1), 4)
    pool.free([block])
    (again,) = pool.allocate(1)  # evicts prefix "1"
    assert again == block
    pool.publish([again], prompt(3), 4)
    pool.free([again])
    assert pool.match(prompt(1)) == [] and pool.match(prompt(3)) == [block]


def test_without_prefix_caching_an_undone_lookup_leaves_the_statistics_at_zero():
    # A prompt waiting for blocks is looked up and undone at every schedule(); with caching off
    # the lookup counts nothing, so undoing it must not count below zero (GetServerInfo's fields
    # are unsigned, and a negative count failed it with INTERNAL).
    pool = BlockPool(8, 4, prefix_caching=False)
    blocks = pool.match(list(range(12)))
    assert blocks == []
    pool.unmatch(blocks, 12)
    assert (pool.num_queried_tokens, pool.num_hit_tokens) == (0, 0)
