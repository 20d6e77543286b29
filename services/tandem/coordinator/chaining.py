"""Decode chaining: a micro-batch's next decode step planned before its tokens are known. Pure.

In steady decode every step of a micro-batch is the same sequences, one token each, and the
only thing the next step needs from this one is the tokens it samples. When the last stage
samples them itself (the argmax-only rows of greedy_on_stage), it sends them straight to stage 0
(stage_worker.tokens), so the scheduler can send the next step's plan at once, naming this step
as its input (StepPlan.input_step_id): stage 0 starts it as soon as the tokens exist, without a
round trip through the coordinator. The chained step is a *continuation*; it may be continued in
turn, up to STEPS_IN_FLIGHT steps of one micro-batch in flight, and it becomes an ordinary
in-flight step when the step before it commits.

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

# Steps of one micro-batch in flight at once: the step, its continuation and the continuation's.
# With two, the coordinator must commit step n and send step n+2's plan while stage 0 computes one
# step, on cores the stages keep busy: on the mid-model engine run (docs/benchmarks.md, stages of
# 12-15 ms a step) stage 0 waited 5.3 ms a step on average for its next plan. A third step leaves
# the coordinator a whole round of the pipeline (four alternating runs each: 1,562 against 1,674
# output tok/s, medians, idle of the cores 9-12% against 7-10%), and costs a row computed for
# nothing when a sequence ends on a stop token.
STEPS_IN_FLIGHT = 3


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
    return [seq for seq in rows if len(seq.output_ids) + len(seq.chained_step_ids) + 2 <= seq.max_tokens]


def steps_before(record: InFlight, in_flight: Mapping[int, InFlight]) -> int:
    """The steps of `record`'s chain still in flight before it."""
    n = 0
    while (before := in_flight.get(record.input_step_id)) is not None:
        record, n = before, n + 1
    return n


def blocks_for_next(pool: BlockPool, seq: Sequence) -> int:
    """Blocks `seq` must add to hold the token its last step in flight samples (position num_tokens
    plus the continuations it is in already)."""
    return max(0, -(-(seq.num_tokens + len(seq.chained_step_ids) + 1) // pool.block_size) - len(seq.block_table))
