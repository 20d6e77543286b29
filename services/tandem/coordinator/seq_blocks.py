"""A sequence's KV blocks in the coordinator's block pool: the prefix it finds cached, the blocks
it still needs, and the full blocks it publishes once every stage computed them. Pure."""

from __future__ import annotations

from tandem.coordinator.steps import Sequence
from tandem.core.block_pool import BlockPool


def match_prefix(pool: BlockPool, seq: Sequence) -> int:
    """For a sequence with nothing computed and no blocks: take the cached blocks its tokens
    begin with (all but its last token, which must be computed for its logits). Returns the
    tokens looked up, 0 when there was no lookup."""
    if seq.num_computed_tokens or seq.block_table:
        return 0
    lookup = seq.tokens_from(0)[:-1]
    seq.block_table = pool.match(lookup)
    seq.num_computed_tokens = len(seq.block_table) * pool.block_size
    return len(lookup)


def unmatch_prefix(pool: BlockPool, seq: Sequence, num_queried: int) -> None:
    """Undo `match_prefix` for a sequence that was not admitted after all."""
    pool.unmatch(seq.block_table, num_queried)
    seq.block_table, seq.num_computed_tokens = [], 0


def blocks_needed(pool: BlockPool, seq: Sequence, num_new: int) -> int:
    """Blocks `seq` must add to its table to hold `num_new` more tokens."""
    return max(0, -(-(seq.num_computed_tokens + num_new) // pool.block_size) - len(seq.block_table))


def set_computed(pool: BlockPool, seq: Sequence, num_computed: int) -> None:
    """Every stage holds the KV of `seq`'s first `num_computed` tokens: the blocks that filled up
    go to the prefix cache."""
    before, seq.num_computed_tokens = seq.num_computed_tokens, num_computed
    if num_computed // pool.block_size > before // pool.block_size:
        pool.publish(seq.block_table, seq.tokens_from(0, num_computed), num_computed)
