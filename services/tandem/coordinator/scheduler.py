"""The coordinator's scheduler: pure, no I/O.

The contract: `add()` a sequence; `schedule()` returns the next step to send (or None);
`update()` takes the rows a sampler answered for a step and, once every row of the step is
in, commits them and returns what was committed. `retry()`, `finish()` and `fail()` tell it of
lost rows, ended sequences and lost steps. The scheduler holds the one record of the steps in
flight, so what it returns is all the loop needs to act on.

Continuous batching over micro-batches: a sequence is in at most one in-flight step, and it
joins a later step only after its token is committed (token safety). Each step takes its
share of the ready decodes (all ready sequences spread over the micro-batches in flight),
resumes swapped sequences, then admits waiting prompts while blocks and the token budget
allow. When blocks run out, the most recently arrived idle sequence is preempted: swapped
to the KV store when it has room, else its blocks are freed and it is recomputed later.

With temporal phases (TD-Pipe; coordinator/td_pipe.py) the whole pipeline runs either
prefill micro-batches or decode micro-batches, never both: the phase is decided at each
`schedule()`, prompts are admitted only while the projected KV peak fits, and the switch back
to prefill follows the stages' forward time.

With prefix caching (core.block_pool), a prompt admitted starts from the longest run of
its full blocks already cached, computing only the rest (at least its last token, whose logits
it samples from); blocks are published once the step that computed them commits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping

from tandem.coordinator.steps import (
    Commit,
    InFlight,
    Sampled,
    ScheduledSequence,
    Sequence,
    Status,
    Step,
)
from tandem.coordinator.td_pipe import Phase, Projection, Running, TemporalPhases
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
        phases: TemporalPhases | None = None,
    ):
        self.blocks = BlockPool(num_blocks, block_size, prefix_caching)
        self.host_blocks_free = num_host_blocks
        self.block_size = block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_in_flight = max_in_flight
        self.phases = phases
        self.seqs: dict[str, Sequence] = {}
        self.waiting: deque[str] = deque()
        self.swapped: deque[str] = deque()
        self.in_flight: dict[int, InFlight] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self._swapped_blocks: dict[str, int] = {}
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
        return len(self.in_flight) < self.max_in_flight

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
        """The next micro-batch, or None when nothing can run now."""
        if not self.can_schedule:
            return None
        step = Step(self._next_step, [], [], [], [])
        budget = self.max_num_batched_tokens
        decode = admit = True
        projection: Projection | None = None
        if self.phases is not None:
            projection = self.phases.projection(self._running())
            phase = self.phases.begin_step(projection, self._head(), len(self.waiting))
            decode, admit = phase is Phase.DECODE, phase is Phase.PREFILL
        ready = [s for s in self.seqs.values() if s.status == Status.READY and s.sampler] if decode else []
        share = -(-(len(ready) + sum(len(r.rows) for r in self.in_flight.values())) // self.max_in_flight)
        for seq in ready[: min(share, self.max_num_seqs)]:
            if seq.status == Status.READY and self._grow(seq, 1, step):
                budget -= 1
                self._take(seq, step)
        while decode and self.swapped and len(step.sequences) < self.max_num_seqs:
            seq = self.seqs[self.swapped[0]]
            if not seq.sampler or not self.blocks.can_allocate(self._swapped_blocks[seq.request_id] + 1):
                break
            self.swapped.popleft()
            seq.block_table = self.blocks.allocate(self._swapped_blocks[seq.request_id])
            self.host_blocks_free += self._swapped_blocks.pop(seq.request_id)
            step.swap_in.append((seq.request_id, list(seq.block_table)))
            self._grow(seq, 1, step)
            budget -= 1
            self._take(seq, step)
        while admit and self.waiting and len(step.sequences) < self.max_num_seqs:
            seq = self.seqs[self.waiting[0]]
            if not seq.sampler:
                break
            candidate = self._as_running(seq)
            if projection is not None and self.phases is not None and not self.phases.fits(projection, candidate):
                break
            queried = self._match_prefix(seq)
            num_new = len(seq.prompt_ids) + len(seq.output_ids) - seq.num_computed_tokens
            if (num_new > budget and step.sequences) or not self.blocks.can_allocate(self._blocks_needed(seq, num_new)):
                if queried:  # not admitted: the lookup is undone, to be made again next time
                    self.blocks.unmatch(seq.block_table, queried)
                    seq.block_table, seq.num_computed_tokens = [], 0
                break
            self.waiting.popleft()
            self._grow(seq, num_new, step)
            budget -= num_new
            self._take(seq, step)
            if projection is not None:
                projection.add(candidate)
        if self.phases is not None and projection is not None and decode and step.sequences:
            self.phases.after_decode(len(step.sequences), self._waiting_prompt_lens(), projection, self._head())
        if not step.sequences and not step.swap_out and not self._finished_ids:
            return None
        step.finished_request_ids, self._finished_ids = self._finished_ids, []
        self._next_step += 1
        if step.sequences:
            rows: dict[str, Sampled | None] = {s.request_id: None for s in step.sequences}
            self.in_flight[step.step_id] = InFlight(step.step_id, time.monotonic(), rows)
        return step

    def update(self, step_id: int, sampled: Mapping[str, Sampled]) -> list[Commit]:
        """Take a sampler's answers for rows of a step. Rows not in the step (moved elsewhere)
        and rows answered already are ignored; once every row is in, the step commits."""
        record = self.in_flight.get(step_id)
        if record is None:
            return []
        for rid, row in sampled.items():
            if rid in record.rows and record.rows[rid] is None:
                record.rows[rid] = row
                record.num_answered += 1
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
            seq.step_id = 0
            if len(seq.prompt_ids) + len(seq.output_ids) - seq.num_computed_tokens > 1:  # a prefill: it queues again, first
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
            self.swapped.remove(request_id)
            self.host_blocks_free += self._swapped_blocks.pop(request_id)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        self._finished_ids.append(request_id)
        record = self.in_flight.get(seq.step_id)
        if record is None:
            return []
        if record.rows.pop(request_id) is not None:
            record.num_answered -= 1
        return self._commit_if_complete(record)

    def fail(self, step_id: int) -> list[str]:
        """A step was lost; its sequences are returned for the caller to finish."""
        record = self.in_flight.pop(step_id, None)
        if record is None:
            return []
        for rid in record.rows:
            self.seqs[rid].step_id = 0
        return list(record.rows)

    def recompute_all(self) -> list[str]:
        """A stage lost its KV cache: every step in flight is dropped and every sequence computes
        its tokens again from the start, first in line in arrival order (its sampled tokens stay;
        sampling the same rows again gives the same tokens). Returns the sequences that were
        swapped out, whose blocks the caller frees in the KV store."""
        self.in_flight.clear()
        swapped = list(self.swapped)
        self.swapped.clear()
        self.host_blocks_free += sum(self._swapped_blocks.values())
        self._swapped_blocks.clear()
        for seq in self.seqs.values():
            self.blocks.free(seq.block_table)
            seq.block_table, seq.num_blocks_on_stages, seq.num_computed_tokens, seq.step_id = [], 0, 0, 0
            seq.status = Status.WAITING
        self.blocks.forget_cached()
        self.waiting = deque(self.seqs)  # arrival order
        return swapped

    # --- helpers ------------------------------------------------------------------------

    def _as_running(self, seq: Sequence) -> Running:
        return Running(len(seq.prompt_ids) + len(seq.output_ids), max(0, seq.predicted_output_len - len(seq.output_ids)))

    def _running(self) -> list[Running]:
        """What temporal phases project: every sequence holding (or owed) KV blocks."""
        return [self._as_running(s) for s in self.seqs.values() if s.status is not Status.WAITING]

    def _head(self) -> Running | None:
        return self._as_running(self.seqs[self.waiting[0]]) if self.waiting else None

    def _waiting_prompt_lens(self, most: int = 256) -> list[int]:
        """Tokens to prefill of the prompts a prefill round would take first (at most `most`)."""
        lens = []
        for rid in self.waiting:
            seq = self.seqs[rid]
            lens.append(len(seq.prompt_ids) + len(seq.output_ids) - seq.num_computed_tokens)
            if len(lens) >= most:
                break
        return lens

    def _commit_if_complete(self, record: InFlight) -> list[Commit]:
        if not record.is_complete:
            return []
        del self.in_flight[record.step_id]
        commits = []
        for rid, row in record.rows.items():
            seq = self.seqs[rid]
            seq.status, seq.step_id = Status.READY, 0
            computed, seq.num_computed_tokens = seq.num_computed_tokens, len(seq.prompt_ids) + len(seq.output_ids)
            if seq.num_computed_tokens // self.block_size > computed // self.block_size:  # a block filled up
                self.blocks.publish(seq.block_table, seq.tokens_from(0), seq.num_computed_tokens)
            seq.output_ids.append(row.token_id)
            commits.append((seq, row))
        return commits

    def _match_prefix(self, seq: Sequence) -> int:
        """For a sequence with nothing computed and no blocks: take the cached blocks its tokens
        begin with (all but its last token, which must be computed for its logits). Returns the
        tokens looked up, 0 when there was no lookup."""
        if seq.num_computed_tokens or seq.block_table:
            return 0
        lookup = seq.tokens_from(0)[:-1]
        seq.block_table = self.blocks.match(lookup)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return len(lookup)

    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, -(-(seq.num_computed_tokens + num_new) // self.block_size) - len(seq.block_table))

    def _grow(self, seq: Sequence, num_new: int, step: Step) -> bool:
        """Give `seq` blocks for `num_new` more tokens, preempting idle sequences if needed."""
        needed = self._blocks_needed(seq, num_new)
        if needed == 0:  # most decode steps
            return True
        while not self.blocks.can_allocate(needed):
            if not self._preempt_one(step, exclude=seq):
                return False
        seq.block_table.extend(self.blocks.allocate(needed))
        return True

    def _preempt_one(self, step: Step, exclude: Sequence) -> bool:
        in_step = {s.request_id for s in step.sequences}
        victims = [s for s in self.seqs.values() if s.status == Status.READY and s is not exclude and s.request_id not in in_step]
        if not victims:
            return False
        victim = victims[-1]  # the most recently arrived
        self.num_preemptions += 1
        n = len(victim.block_table)
        if n <= self.host_blocks_free:
            step.swap_out.append((victim.request_id, list(victim.block_table)))
            self.host_blocks_free -= n
            self._swapped_blocks[victim.request_id] = n
            victim.status = Status.SWAPPED
            self.swapped.append(victim.request_id)
        else:  # recompute: prompt and output so far are prefilled again
            victim.num_computed_tokens = 0
            victim.status = Status.WAITING
            self.waiting.appendleft(victim.request_id)
        self.blocks.free(victim.block_table)
        victim.block_table, victim.num_blocks_on_stages = [], 0  # the stages get its next table whole
        return True

    def _take(self, seq: Sequence, step: Step) -> None:
        seq.status, seq.step_id = Status.IN_FLIGHT, step.step_id
        held, seq.num_blocks_on_stages = seq.num_blocks_on_stages, len(seq.block_table)
        step.sequences.append(
            ScheduledSequence(
                request_id=seq.request_id,
                num_computed_tokens=seq.num_computed_tokens,
                input_ids=seq.tokens_from(seq.num_computed_tokens),
                block_table=[] if held else list(seq.block_table),
                new_block_ids=seq.block_table[held:] if held else [],
                sample_index=len(seq.output_ids),
                sampler=seq.sampler,
            )
        )
