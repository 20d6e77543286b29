"""Preemption: which sequence gives its KV blocks up when a step needs more than are free, and
how. Pure, no I/O; the scheduler (scheduler.py) calls it while it builds a step.

The victim is the most recently arrived idle sequence (ready for its next token, or waiting for
its next prefill chunk) outside the step being built. A ready one is swapped out to the KV store
when the store has room for its blocks (the step carries the swap-out to the stages); otherwise
its blocks are freed and it is recomputed later, its prompt and output so far prefilled again
(a partly prefilled one always is, from the prefix cache where its chunks' full blocks still are).
"""

from __future__ import annotations

from collections.abc import Iterable

from tandem.coordinator.steps import Sequence, Status, Step
from tandem.coordinator.swap_space import SwapSpace
from tandem.core.block_pool import BlockPool


def victim(seqs: Iterable[Sequence], step: Step, exclude: Sequence) -> Sequence | None:
    """Of `seqs` in arrival order, the one to preempt so that `exclude` can grow in `step`; None
    when every other one is busy or in the step."""
    in_step = {s.request_id for s in step.sequences}
    victims = [s for s in seqs if s.status in (Status.READY, Status.PREFILLING)
               and s is not exclude and s.request_id not in in_step]
    return victims[-1] if victims else None  # the most recently arrived


def preempt(seq: Sequence, step: Step, blocks: BlockPool, swapped: SwapSpace) -> bool:
    """Free `seq`'s blocks in the pool: True when it was swapped out with `step`; False when it is
    to be recomputed (the caller queues it again, first)."""
    n = len(seq.block_table)
    is_swapped = swapped.can_hold(n) and seq.status == Status.READY  # a partial prefill recomputes
    if is_swapped:
        step.swap_out.append((seq.request_id, list(seq.block_table)))
        swapped.put(seq.request_id, n)
        seq.status = Status.SWAPPED
    else:  # recompute: prompt and output so far are prefilled again
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
    blocks.free(seq.block_table)
    seq.block_table, seq.num_blocks_on_stages = [], 0  # the stages get its next table whole
    return is_swapped
