"""What the scheduler works on: sequences, the steps it makes of them, the samplers' answers,
and the record of a step in flight."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Status(enum.Enum):
    WAITING = "waiting"  # needs prefill (new, or preempted for recompute)
    READY = "ready"  # has its last token committed, waits for a step
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
    step_id: int = 0  # the in-flight step it is in; 0: none
    output_len_hint: int = 0  # the client's guess of its output length; 0: none
    predicted_output_len: int = 0  # temporal phases' prediction (set when added)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens_from(self, start: int) -> list[int]:
        """token_ids[start:], without copying the whole history (a decode needs one token)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt :]
        return self.prompt_ids[start:] + self.output_ids


class ScheduledSequence(NamedTuple):  # a tuple: one is made per sequence per step, and cheaply
    request_id: str
    num_computed_tokens: int
    input_ids: list[int]
    block_table: list[int]  # the whole table when the stages hold none for the sequence, else empty
    new_block_ids: list[int]  # with an empty block_table: the ids appended since the stages' copy
    sample_index: int
    sampler: str


@dataclass
class Step:
    step_id: int
    sequences: list[ScheduledSequence]
    finished_request_ids: list[str]
    swap_out: list[tuple[str, list[int]]]
    swap_in: list[tuple[str, list[int]]]


class Sampled(NamedTuple):
    """A sampler's answer for one row: the token, and its logprobs for the client (unread here)."""

    token_id: int
    logprobs: Any = None


Commit = tuple[Sequence, Sampled]


@dataclass
class InFlight:
    """A step sent and not yet committed: its rows in plan order, each None until answered."""

    step_id: int
    sent_time: float
    rows: dict[str, Sampled | None]
    num_answered: int = 0

    @property
    def is_complete(self) -> bool:
        return self.num_answered == len(self.rows)
