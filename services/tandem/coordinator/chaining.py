"""Decode chaining: a micro-batch's next decode step planned before its tokens are known. Pure.

In steady decode every step of a micro-batch is the same sequences, one token each, and the
only thing the next step needs from this one is the tokens it samples. When the last stage
samples them itself (the argmax-only rows of greedy_on_stage), it sends them straight to stage 0
(stage_worker.tokens), so the scheduler can send the next step's plan at once, naming this step
as its input (StepPlan.input_step_id): stage 0 starts it as soon as the tokens exist, without a
round trip through the coordinator. The chained step is a *continuation*; it becomes an ordinary
in-flight step when the step before it commits, and may then be continued in turn, so a
micro-batch has at most two steps in flight.

A chain runs only while nothing else wants a step and the micro-batches are about even: no prompt waits or is part-way through its
prefill, nothing is swapped out, every sequence is in flight, and temporal phases (if on) are
decoding. A sequence whose step samples its last allowed token is left out of the continuation;
one that ends otherwise (a stop token, an abort) leaves it when it ends: its row is computed and
its token dropped, the price of not waiting. Blocks for the continuation's token are taken
without preempting anyone; when they are short, the chain waits for the next ordinary step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tandem.coordinator.steps import InFlight, Sequence, Status
from tandem.core.block_pool import BlockPool


def may_chain(seqs: Iterable[Sequence], num_waiting: int, is_decoding: bool) -> bool:
    """Nothing but the sequences in flight wants a step."""
    return is_decoding and num_waiting == 0 and all(s.status == Status.IN_FLIGHT for s in seqs)


def continued_rows(record: InFlight, seqs: Mapping[str, Sequence], sampler: str, share: float) -> list[Sequence] | None:
    """The sequences of in-flight step `record` that a continuation takes, or None when the step
    cannot be continued: a prefill chunk in it, a row another sampler than `sampler` (the one the
    last stage hosts) samples, or more or fewer rows than its `share` of the running sequences,
    give or take one row or 3% (a chain keeps its micro-batch as it is, so an uneven one is left
    to the ordinary steps, which even them out). A sequence whose step samples its last allowed
    token is left out."""
    if record.chunks or not record.rows or abs(len(record.rows) - share) > max(1.0, share / 32):
        return None
    rows = [seqs[rid] for rid in record.rows]
    if any(seq.sampler != sampler for seq in rows):
        return None
    return [seq for seq in rows if len(seq.output_ids) + 2 <= seq.max_tokens]


def blocks_for_next(pool: BlockPool, seq: Sequence) -> int:
    """Blocks `seq` must add to hold the token its in-flight step samples (position num_tokens)."""
    return max(0, -(-(seq.num_tokens + 1) // pool.block_size) - len(seq.block_table))
