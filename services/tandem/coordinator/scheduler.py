"""The coordinator's scheduler: pure, no I/O.

The contract: `add()` a sequence; `schedule()` returns the next step to send (or None);
`update()` takes the rows a sampler answered for a step and, once every row of the step is
in, commits them and returns what was committed. `retry()`, `finish()` and `fail()` tell it of
lost rows, ended sequences and lost steps. The scheduler holds the one record of the steps in
flight, so what it returns is all the loop needs to act on.

A step spends a budget of `max_num_batched_tokens`: its share of the ready decodes, then the
next chunks of partly prefilled prompts (chunked prefill, budget.py), swapped sequences coming
back and waiting prompts (from their cached prefix, seq_blocks.py), while blocks allow; when they
run out, an idle sequence is preempted (preemption.py). A sequence is in at most one step in
flight (token safety) but for decode chaining (chaining.py), a few in a row. With temporal phases (td_pipe.py)
the pipeline runs prefill or decode micro-batches, never both. docs/architecture.md, "The life
of one request", step 4, tells the whole of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from tandem.coordinator import chaining, preemption
from tandem.coordinator.budget import fill_step_budget, filling, num_decodes, prefill_chunk, prompt_tokens_pending
from tandem.coordinator.kv_projection import as_running, head_of_line
from tandem.coordinator.seq_blocks import blocks_needed, match_prefix, set_computed, unmatch_prefix
from tandem.coordinator.steps import (
    Commit,
    InFlight,
    Sampled,
    ScheduledSequence,
    Sequence,
    Status,
    Step,
)
from tandem.coordinator.swap_space import SwapSpace
from tandem.coordinator.td_pipe import Phase, TemporalPhases, waiting_prompt_lens
from tandem.core.block_pool import BlockPool

__all__ = ["Commit", "InFlight", "Sampled", "ScheduledSequence", "Scheduler", "Sequence", "Status", "Step"]


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_in_flight: int,
        num_host_blocks: int = 0,
        prefix_caching: bool = True,
        chunked_prefill: bool = True,
        phases: TemporalPhases | None = None,
        chain_sampler: str = "",
        chain_steps: int = chaining.STEPS_IN_FLIGHT,
    ):
        self.blocks = BlockPool(num_blocks, block_size, prefix_caching)
        self.swapped = SwapSpace(num_host_blocks)
        self.block_size = block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_in_flight, self.chunked_prefill = max_in_flight, chunked_prefill
        self.phases = phases
        self.chain_sampler = chain_sampler  # decode chaining (coordinator/chaining.py) for rows it samples; "": off
        self.chain_steps = chain_steps  # most steps of one micro-batch in flight when chained
        self.seqs: dict[str, Sequence] = {}
        self.waiting: deque[str] = deque()
        self.in_flight: dict[int, InFlight] = {}
        self.num_preemptions = 0
        self.num_chained_steps = 0
        self._finished_ids: list[str] = []
        self._next_step = 1

    # --- queries ------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.seqs) - len(self.waiting) - len(self.swapped)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    @property
    def can_schedule(self) -> bool:
        """A micro-batch slot is free (a continuation rides in its step's slot)."""
        return sum(1 for r in self.in_flight.values() if not self._rides(r)) < self.max_in_flight

    def sampled_token(self, request_id: str) -> int | None:
        """The token sampled for `request_id` in its in-flight step and not yet committed."""
        seq = self.seqs.get(request_id)
        record = self.in_flight.get(seq.step_id) if seq is not None else None
        sampled = record.rows.get(request_id) if record is not None else None
        return sampled.token_id if sampled is not None else None

    def unanswered(self, step_id: int) -> list[str]:
        """The rows of an in-flight step still waiting for their sampler."""
        record = self.in_flight.get(step_id)
        return [rid for rid, s in record.rows.items() if s is None] if record is not None else []

    def expired(self, sent_before: float) -> list[int]:
        """The in-flight steps sent before time `sent_before` (time.monotonic)."""
        return [r.step_id for r in self.in_flight.values() if r.sent_time < sent_before]

    # --- the contract -------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if self.phases is not None:
            seq.predicted_output_len = self.phases.predict(len(seq.prompt_ids), seq.max_tokens, seq.output_len_hint or None)
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq.request_id)

    def schedule(self) -> Step | None:
        """The next micro-batch, or the continuation of one in flight (decode chaining), or None
        when nothing can run now."""
        step = self._schedule_new() if self.can_schedule else None
        return step if step is not None or not self.chain_sampler else self._chain()

    def _schedule_new(self) -> Step | None:
        step = Step(self._next_step, [], [], [], [])
        budget = self.max_num_batched_tokens
        decode, admit, projection = (True, True, None) if self.phases is None else self.phases.what_may_run(
            self.seqs, self.waiting, bool(self.in_flight), self.blocks.num_free)
        ready = [s for s in self.seqs.values() if s.status == Status.READY and s.sampler] if decode else []
        num_rows_in_flight = sum(len(r.rows) for r in self.in_flight.values() if not self._rides(r))
        for seq in ready[: num_decodes(len(ready), num_rows_in_flight, self.max_in_flight, self.max_num_seqs, budget)]:
            if seq.status == Status.READY and self._grow(seq, 1, step):
                budget -= 1
                step.take(seq, 1)
        if admit and filling(self.seqs, self.waiting):  # prompts flow through the stages in several micro-batches
            budget = fill_step_budget(budget, prompt_tokens_pending(self.seqs, self.waiting), self.max_in_flight)
        for seq in [s for s in self.seqs.values() if s.status == Status.PREFILLING and s.sampler and admit]:
            num_new = prefill_chunk(seq.num_tokens - seq.num_computed_tokens, budget, self.chunked_prefill,
                                    not step.sequences)
            if not num_new or len(step.sequences) == self.max_num_seqs:
                break
            if seq.status != Status.PREFILLING:  # preempted for a sequence before it in this loop
                continue
            if not self._grow(seq, num_new, step):
                break
            budget -= num_new
            step.take(seq, num_new)
        while decode and self.swapped and len(step.sequences) < self.max_num_seqs and budget > 0:
            seq = self.seqs[self.swapped.first]
            if not seq.sampler or not self.blocks.can_allocate(self.swapped.num_blocks_of(seq.request_id) + 1):
                break
            seq.block_table = self.blocks.allocate(self.swapped.take(seq.request_id))
            step.swap_in.append((seq.request_id, list(seq.block_table)))
            self._grow(seq, 1, step)
            budget -= 1
            step.take(seq, 1)
        while admit and self.waiting and len(step.sequences) < self.max_num_seqs:
            seq = self.seqs[self.waiting[0]]
            if not seq.sampler or (projection is not None and not projection.fits_or_alone(as_running(seq))):
                break
            queried = match_prefix(self.blocks, seq)
            num_new = prefill_chunk(seq.num_tokens - seq.num_computed_tokens, budget, self.chunked_prefill,
                                    not step.sequences)
            if not num_new or not self.blocks.can_allocate(blocks_needed(self.blocks, seq, num_new)):
                if queried:  # not admitted: the lookup is undone, to be made again next time
                    unmatch_prefix(self.blocks, seq, queried)
                break
            self.waiting.popleft()
            self._grow(seq, num_new, step)
            budget -= num_new
            step.take(seq, num_new)
            if projection is not None:
                projection.add(as_running(seq))
        if self.phases is not None and projection is not None and decode and step.sequences:
            self.phases.after_decode(len(step.sequences), waiting_prompt_lens(self.seqs, self.waiting), projection,
                                     head_of_line(self.seqs, self.waiting))
        if not step.sequences and not step.swap_out and not self._finished_ids:
            return None
        step.finished_request_ids, self._finished_ids = self._finished_ids, []
        self._next_step += 1
        if step.sequences:
            self.in_flight[step.step_id] = InFlight.of(step)
        return step

    def update(self, step_id: int, sampled: Mapping[str, Sampled]) -> list[Commit]:
        """Take a sampler's answers for rows of a step. Rows not in the step (moved elsewhere)
        and rows answered already are ignored; once every row is in, the step commits."""
        record = self.in_flight.get(step_id)
        if record is None:
            return []
        record.answer(sampled)
        return self._commit_if_complete(record)

    def computed(self, step_id: int) -> list[Commit]:
        """The last stage ran step `step_id`, so every stage holds the KV of its prefill chunks;
        returns what that completes."""
        record = self.in_flight.get(step_id)
        if record is None:
            return []
        record.is_computed = True
        return self._commit_if_complete(record)

    def retry(self, request_ids: list[str]) -> list[Commit]:
        """These sequences lost their sampler: their unanswered rows leave their steps and run
        the same tokens again in a later one (rewriting the same KV positions with the same
        values is harmless, so nothing on the stages is undone). Returns what that completes."""
        commits: list[Commit] = []
        for rid in request_ids:
            seq = self.seqs.get(rid)
            record = self.in_flight.get(seq.step_id) if seq is not None else None
            if record is None or rid not in record.rows or record.rows[rid] is not None:
                continue  # not in flight, or answered already: it commits with its step
            del record.rows[rid]
            for chained_id in seq.chained_step_ids[::-1]:
                if (chained := self.in_flight.get(chained_id)) is not None:
                    chained.drop(rid)  # its token will not come
                    commits += self._commit_if_complete(chained)
            seq.step_id, seq.chained_step_ids = 0, []
            if seq.num_tokens - seq.num_computed_tokens > 1:  # a prefill: it queues again, first
                seq.status = Status.WAITING
                self.waiting.appendleft(rid)
            else:
                seq.status = Status.READY
            commits += self._commit_if_complete(record)
        return commits

    def finish(self, request_id: str) -> list[Commit]:
        """End a sequence: free its blocks (on the stages with the next step); returns what its
        leaving completes of the step it was in."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return []
        seq.status = Status.FINISHED
        if self.phases is not None and seq.output_ids:
            self.phases.observe(len(seq.prompt_ids), len(seq.output_ids))
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        if request_id in self.swapped:  # the caller frees its blocks in the KV store
            self.swapped.take(request_id)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        self._finished_ids.append(request_id)
        commits: list[Commit] = []
        for step_id in (*seq.chained_step_ids[::-1], seq.step_id):
            if (record := self.in_flight.get(step_id)) is not None:
                record.drop(request_id)
                commits += self._commit_if_complete(record)
        return commits

    def fail(self, step_id: int) -> list[str]:
        """A step was lost; its sequences are returned for the caller to finish."""
        record = self.in_flight.pop(step_id, None)
        if record is None:
            return []
        for rid in record.request_ids:
            self.seqs[rid].step_id = 0
        return record.request_ids

    def recompute_all(self) -> list[str]:
        """A stage lost its KV cache: every step in flight is dropped and every sequence computes
        its tokens again from the start, first in line in arrival order (its sampled tokens stay;
        sampling the same rows again gives the same tokens). Returns the sequences that were
        swapped out, whose blocks the caller frees in the KV store."""
        self.in_flight.clear()
        swapped = self.swapped.clear()
        for seq in self.seqs.values():
            self.blocks.free(seq.block_table)
            seq.block_table, seq.num_blocks_on_stages, seq.num_computed_tokens, seq.step_id = [], 0, 0, 0
            seq.chained_step_ids = []
            seq.status = Status.WAITING
        self.blocks.forget_cached()
        self.waiting = deque(self.seqs)  # arrival order
        return swapped

    # --- helpers ------------------------------------------------------------------------

    def _commit_if_complete(self, record: InFlight) -> list[Commit]:
        if not record.is_complete:
            return []
        del self.in_flight[record.step_id]  # its continuation, if any, is an ordinary step in flight from now on
        for rid, num_computed in record.chunks.items():
            seq = self.seqs[rid]
            seq.status, seq.step_id = Status.PREFILLING, 0
            set_computed(self.blocks, seq, num_computed)
        commits = []
        for rid, row in record.rows.items():
            seq = self.seqs[rid]
            if seq.chained_step_ids:  # its next token is in flight already
                seq.status, seq.step_id = Status.IN_FLIGHT, seq.chained_step_ids.pop(0)
            else:
                seq.status, seq.step_id = Status.READY, 0
            set_computed(self.blocks, seq, seq.num_tokens)
            seq.output_ids.append(row.token_id)
            commits.append((seq, row))
        return commits

    def _chain(self) -> Step | None:
        """The continuation of the oldest in-flight step that has none, if its chain of steps in
        flight is shorter than chain_steps and it may be continued; else None. Only the oldest: stage 0
        runs steps in the order they are sent, so a younger micro-batch continued first would put
        two steps of one micro-batch next to each other there, the second waiting for the first's
        tokens to come round the pipeline while the other micro-batch waits behind it."""
        decoding = self.phases is None or self.phases.phase == Phase.DECODE
        if not chaining.may_chain(self.seqs.values(), self.num_waiting, decoding):
            return None
        for record in self.in_flight.values():
            if record.continuation:
                continue
            if chaining.steps_before(record, self.in_flight) + 2 > self.chain_steps:
                return None
            rows = chaining.continued_rows(record, self.seqs, self.chain_sampler, len(self.seqs) / self.max_in_flight)
            if not rows:
                return None
            needed = [chaining.blocks_for_next(self.blocks, seq) for seq in rows]
            if not self.blocks.can_allocate(sum(needed)):
                return None
            step = Step(self._next_step, [], self._finished_ids, [], [], input_step_id=record.step_id)
            self._finished_ids, self._next_step = [], self._next_step + 1
            for seq, n in zip(rows, needed):
                seq.block_table.extend(self.blocks.allocate(n))
                step.take_chained(seq)
            self.in_flight[step.step_id] = InFlight.of(step)
            record.continuation = step.step_id
            self.num_chained_steps += 1
            return step
        return None

    def _rides(self, record: InFlight) -> bool:
        """A continuation whose step before is still in flight: it takes no micro-batch slot of its own."""
        return record.input_step_id in self.in_flight

    def _grow(self, seq: Sequence, num_new: int, step: Step) -> bool:
        """Give `seq` blocks for `num_new` more tokens, preempting idle sequences if needed."""
        needed = blocks_needed(self.blocks, seq, num_new)
        if needed == 0:  # most decode steps
            return True
        while not self.blocks.can_allocate(needed):
            if (victim := preemption.victim(self.seqs.values(), step, exclude=seq)) is None:
                return False
            self.num_preemptions += 1
            if not preemption.preempt(victim, step, self.blocks, self.swapped):  # to be recomputed: first in line
                self.waiting.appendleft(victim.request_id)
        seq.block_table.extend(self.blocks.allocate(needed))
        return True
