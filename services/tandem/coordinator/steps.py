"""What the scheduler works on: sequences, the steps it makes of them, the samplers' answers,
and the record of a step in flight."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Status(enum.Enum):
    WAITING = "waiting"  # needs prefill (new, or preempted for recompute)
    READY = "ready"  # has its last token committed, waits for a step
    PREFILLING = "prefilling"  # part of its prefill computed (chunked prefill), waits for its next chunk
    IN_FLIGHT = "in_flight"
    SWAPPED = "swapped"  # its KV is in the KV store
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: str = ""  # the replica that holds its sampling state; empty: none yet, and it is not scheduled
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_blocks_on_stages: int = 0  # entries of block_table the stages hold; 0: none, the next step sends it whole
    status: Status = Status.WAITING
    step_id: int = 0  # the (first) in-flight step it is in; 0: none
    chained_step_ids: list[int] = field(default_factory=list)  # the chained steps after it, in order (decode chaining)
    output_len_hint: int = 0  # the client's guess of its output length; 0: none
    predicted_output_len: int = 0  # temporal phases' prediction (set when added)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens_from(self, start: int, end: int | None = None) -> list[int]:
        """token_ids[start:end], without copying the whole history (a decode needs one token)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : None if end is None else end - num_prompt]
        if end is not None and end <= num_prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: None if end is None else end - num_prompt]


class ScheduledSequence(NamedTuple):  # a tuple: one is made per sequence per step, and cheaply
    request_id: str
    num_computed_tokens: int
    input_ids: list[int]
    block_table: list[int]  # the whole table when the stages hold none for the sequence, else empty
    new_block_ids: list[int]  # with an empty block_table: the ids appended since the stages' copy
    sample_index: int
    sampler: str
    is_partial_prefill: bool = False  # a prefill chunk short of the end of the tokens: computed, not sampled


@dataclass
class Step:
    step_id: int
    sequences: list[ScheduledSequence]
    finished_request_ids: list[str]
    swap_out: list[tuple[str, list[int]]]
    swap_in: list[tuple[str, list[int]]]
    input_step_id: int = 0  # decode chaining: every sequence's input is the token it samples at this step

    def take(self, seq: Sequence, num_new: int) -> None:
        """Put `seq`'s next `num_new` tokens in the step, which it is in flight in from now on;
        its block table goes whole when the stages hold none of it, else only the ids appended."""
        seq.status, seq.step_id = Status.IN_FLIGHT, self.step_id
        held, seq.num_blocks_on_stages = seq.num_blocks_on_stages, len(seq.block_table)
        end = seq.num_computed_tokens + num_new
        self.sequences.append(
            ScheduledSequence(
                request_id=seq.request_id,
                num_computed_tokens=seq.num_computed_tokens,
                input_ids=seq.tokens_from(seq.num_computed_tokens, end),
                block_table=[] if held else list(seq.block_table),
                new_block_ids=seq.block_table[held:] if held else [],
                sample_index=len(seq.output_ids),
                sampler=seq.sampler,
                is_partial_prefill=end < seq.num_tokens,
            )
        )


    def take_chained(self, seq: Sequence) -> None:
        """Put in this chained step the token `seq`'s last in-flight step samples: the stages get it
        from the last stage, at the position after that step's; the blocks appended since go as ids."""
        assert seq.num_blocks_on_stages, "a chained sequence is in flight: the stages hold its table"
        ahead = len(seq.chained_step_ids)  # its tokens in flight beyond its first step's
        seq.chained_step_ids.append(self.step_id)
        held, seq.num_blocks_on_stages = seq.num_blocks_on_stages, len(seq.block_table)
        self.sequences.append(
            ScheduledSequence(request_id=seq.request_id, num_computed_tokens=seq.num_tokens + ahead, input_ids=[],
                              block_table=[], new_block_ids=seq.block_table[held:],
                              sample_index=len(seq.output_ids) + 1 + ahead, sampler=seq.sampler))


class Sampled(NamedTuple):
    """A sampler's answer for one row: the token, and its logprobs for the client (unread here)."""

    token_id: int
    logprobs: Any = None


Commit = tuple[Sequence, Sampled]


@dataclass
class InFlight:
    """A step sent and not yet committed: its sampled rows in plan order, each None until
    answered, and its partial prefill chunks, which wait only for the step to be computed."""

    step_id: int
    sent_time: float
    rows: dict[str, Sampled | None]
    num_answered: int = 0
    chunks: dict[str, int] = field(default_factory=dict)  # request id -> its computed tokens once the step is
    is_computed: bool = False  # the last stage ran the step: every stage holds its chunks' KV
    continuation: int = 0  # the chained step sent after it for its sequences' next tokens; 0: none
    input_step_id: int = 0  # a continuation: the step whose tokens it takes (Step.input_step_id)

    @classmethod
    def of(cls, step: Step) -> InFlight:
        """The record of a step about to be sent: a row for each sequence it samples, a chunk for
        each partial prefill."""
        rows: dict[str, Sampled | None] = {s.request_id: None for s in step.sequences if not s.is_partial_prefill}
        chunks = {s.request_id: s.num_computed_tokens + len(s.input_ids) for s in step.sequences if s.is_partial_prefill}
        return cls(step.step_id, time.monotonic(), rows, chunks=chunks, input_step_id=step.input_step_id)

    @property
    def is_complete(self) -> bool:
        return self.num_answered == len(self.rows) and (self.is_computed or not self.chunks)

    @property
    def request_ids(self) -> list[str]:
        return [*self.rows, *self.chunks]

    def answer(self, sampled: Mapping[str, Sampled]) -> None:
        """Take a sampler's answers. Rows not in the step (moved elsewhere) and rows answered
        already are ignored."""
        for rid, row in sampled.items():
            if rid in self.rows and self.rows[rid] is None:
                self.rows[rid] = row
                self.num_answered += 1

    def drop(self, request_id: str) -> None:
        """A sequence of the step ended: the step no longer waits for it."""
        if self.chunks.pop(request_id, None) is None and self.rows.pop(request_id, None) is not None:
            self.num_answered -= 1
