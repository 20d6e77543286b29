"""The coordinator's scheduler: pure, no I/O. `schedule()` returns a step plan, `complete()`
takes its sampled tokens, `finish()` ends a sequence.

Continuous batching over micro-batches: a sequence is in at most one in-flight step, and it
joins a later step only after its token is committed (token safety). Each step takes its
share of the ready decodes (all ready sequences spread over the micro-batches in flight),
resumes swapped sequences, then admits waiting prompts while blocks and the token budget
allow. When blocks run out, the most recently arrived idle sequence is preempted: swapped
to the KV store when it has room, else its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from tandem.core.kv_cache import BlockAllocator


class Status(enum.Enum):
    WAITING = "waiting"  # needs prefill (new, or preempted for recompute)
    READY = "ready"  # has its last token committed, waits for a step
    IN_FLIGHT = "in_flight"
    SWAPPED = "swapped"  # its KV is in the KV store
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: str = ""  # the replica that samples it; empty: none yet, and it is not scheduled
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass(frozen=True)
class ScheduledSequence:
    request_id: str
    num_computed_tokens: int
    input_ids: list[int]
    block_table: list[int]
    sample_index: int
    sampler: str


@dataclass
class Step:
    step_id: int
    sequences: list[ScheduledSequence]
    finished_request_ids: list[str]
    swap_out: list[tuple[str, list[int]]]
    swap_in: list[tuple[str, list[int]]]


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_in_flight: int,
        num_host_blocks: int = 0,
    ):
        self.blocks = BlockAllocator(num_blocks)
        self.host_blocks_free = num_host_blocks
        self.block_size = block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_in_flight = max_in_flight
        self.seqs: dict[str, Sequence] = {}
        self.waiting: deque[str] = deque()
        self.swapped: deque[str] = deque()
        self.in_flight: dict[int, list[str]] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self._swapped_blocks: dict[str, int] = {}
        self._next_step = 1

    # --- queries ------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return sum(s.status in (Status.READY, Status.IN_FLIGHT) for s in self.seqs.values())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    @property
    def can_schedule(self) -> bool:
        return len(self.in_flight) < self.max_in_flight

    def has_housekeeping(self) -> bool:
        return bool(self._finished_ids)

    # --- mutations ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq.request_id)

    def schedule(self) -> Step | None:
        """The next micro-batch, or None when nothing can run now."""
        if not self.can_schedule:
            return None
        step = Step(self._next_step, [], [], [], [])
        budget = self.max_num_batched_tokens
        ready = [s for s in self.seqs.values() if s.status == Status.READY and s.sampler]
        share = -(-(len(ready) + sum(len(v) for v in self.in_flight.values())) // self.max_in_flight)
        for seq in ready[: min(share, self.max_num_seqs)]:
            if seq.status == Status.READY and self._grow(seq, 1, step):
                budget -= 1
                self._take(seq, step)
        while self.swapped and len(step.sequences) < self.max_num_seqs:
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
        while self.waiting and len(step.sequences) < self.max_num_seqs:
            seq = self.seqs[self.waiting[0]]
            num_new = len(seq.token_ids) - seq.num_computed_tokens
            if (num_new > budget and step.sequences) or not seq.sampler:
                break
            if not self.blocks.can_allocate(self._blocks_needed(seq, num_new)):
                break
            self.waiting.popleft()
            self._grow(seq, num_new, step)
            budget -= num_new
            self._take(seq, step)
        if not step.sequences and not step.swap_out and not self._finished_ids:
            return None
        step.finished_request_ids, self._finished_ids = self._finished_ids, []
        self._next_step += 1
        if step.sequences:
            self.in_flight[step.step_id] = [s.request_id for s in step.sequences]
        return step

    def complete(self, step_id: int, tokens: dict[str, int]) -> list[Sequence]:
        """Commit the sampled tokens of a step; returns the sequences that got one."""
        committed = []
        for rid in self.in_flight.pop(step_id, []):
            seq = self.seqs.get(rid)
            if seq is None or seq.status == Status.FINISHED:
                continue
            seq.status = Status.READY
            if rid in tokens:
                seq.num_computed_tokens = len(seq.token_ids)
                seq.output_ids.append(tokens[rid])
                committed.append(seq)
        return committed

    def retry(self, step_id: int, request_ids: list[str]) -> None:
        """These sequences' rows of an in-flight step were lost (their sampler went away): they
        leave the step and run the same tokens again in a later one. Rewriting the same KV
        positions with the same values is harmless, so nothing on the stages is undone."""
        in_flight = self.in_flight.get(step_id, [])
        for rid in request_ids:
            in_flight.remove(rid)
            seq = self.seqs[rid]
            if seq.num_computed_tokens == 0:  # a prefill: it queues again, first in line
                seq.status = Status.WAITING
                self.waiting.appendleft(rid)
            else:
                seq.status = Status.READY

    def fail_step(self, step_id: int) -> list[str]:
        """A step was lost; its sequences are returned for the caller to finish."""
        return self.in_flight.pop(step_id, [])

    def finish(self, request_id: str) -> None:
        """End a sequence: free its blocks (after its in-flight step, if any) everywhere."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return
        seq.status = Status.FINISHED
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        if request_id in self.swapped:  # the caller frees its blocks in the KV store
            self.swapped.remove(request_id)
            self.host_blocks_free += self._swapped_blocks.pop(request_id)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        self._finished_ids.append(request_id)

    # --- helpers ------------------------------------------------------------------------

    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, -(-(seq.num_computed_tokens + num_new) // self.block_size) - len(seq.block_table))

    def _grow(self, seq: Sequence, num_new: int, step: Step) -> bool:
        """Give `seq` blocks for `num_new` more tokens, preempting idle sequences if needed."""
        needed = self._blocks_needed(seq, num_new)
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
        victim.block_table = []
        return True

    def _take(self, seq: Sequence, step: Step) -> None:
        seq.status = Status.IN_FLIGHT
        step.sequences.append(
            ScheduledSequence(
                request_id=seq.request_id,
                num_computed_tokens=seq.num_computed_tokens,
                input_ids=seq.token_ids[seq.num_computed_tokens :],
                block_table=list(seq.block_table),
                sample_index=len(seq.output_ids),
                sampler=seq.sampler,
            )
        )
