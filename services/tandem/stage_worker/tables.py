"""What a stage keeps of the plans it was sent: each live request's block table and the sampler
table. Plans send a sequence's table whole once, then only the block ids appended since, and
name samplers by index (protos/tandem/v1/stage_worker.proto); this turns them back into whole
tables and sampler addresses, each checked against the stage's own sampler configuration
(`is_known_sampler`, stage_worker.samplers) on a stage that sends logits. gRPC-free; plans are
applied in the order sent, by one thread."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tandem.core.errors import InvalidArgumentError
from tandem.v1 import stage_worker_pb2 as pb


@dataclass(frozen=True)
class Resolved:
    """A plan's sequences as the stage holds them, in row order."""

    block_tables: list[list[int]]  # each sequence's whole block table (a copy)
    samplers: list[str]  # host:port of each row's sampler


class PlanTables:
    """`is_known_sampler(address)`: whether the stage's own configuration names that sampler; None
    on a stage that sends no logits (it never dials a sampler, so it checks none)."""

    def __init__(self, num_blocks: int, is_known_sampler: Callable[[str], bool] | None = None):
        self.num_blocks, self.is_known_sampler = num_blocks, is_known_sampler
        self.blocks_of: dict[str, list[int]] = {}  # live request -> its block table
        self.samplers: list[str] = []  # host:port by index, from the stream's latest table

    def apply(self, plan: pb.StepPlan) -> Resolved:
        """Take a plan's changes: forget finished and swapped-out requests, take a new sampler
        table, then set or extend each sequence's block table. A sequence that appends to a
        table the stage does not hold, names a sampler outside the table, or one the stage's own
        configuration does not know, is refused (what came before it in the plan stays applied:
        the coordinator fails the step's requests)."""
        for rid in plan.finished_request_ids:
            self.blocks_of.pop(rid, None)
        for t in plan.swap_out:
            self.blocks_of.pop(t.request_id, None)
        if plan.sampler_addresses:
            self.samplers = list(plan.sampler_addresses)
        tables, samplers = [], []
        for s in plan.sequences:
            if s.sampler_index >= len(self.samplers):
                raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} names sampler "
                                           f"{s.sampler_index}, outside the stage's table of {len(self.samplers)}")
            sampler = self._sampler(plan.step_id, s)
            if s.block_table:
                if s.new_block_ids:
                    raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} sends a whole "
                                               f"block table and new block ids; a plan sends one or the other")
                self.check_block_ids(plan.step_id, s.block_table)
                table = self.blocks_of[s.request_id] = list(s.block_table)
            else:
                held = self.blocks_of.get(s.request_id)
                if held is None:
                    raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} appends to a block "
                                               f"table this stage does not hold (its whole table never came)")
                self.check_block_ids(plan.step_id, s.new_block_ids)
                held.extend(s.new_block_ids)
                table = held
            tables.append(list(table))
            samplers.append(sampler)
        return Resolved(tables, samplers)

    def _sampler(self, step_id: int, s: pb.SequencePlan) -> str:
        address = self.samplers[s.sampler_index]
        if self.is_known_sampler is not None and not self.is_known_sampler(address):
            raise InvalidArgumentError(f"step {step_id}: request {s.request_id!r} names sampler {address[:256]!r}, which "
                                       "this stage's own sampler configuration (samplers, sampler_discovery) does not know")
        return address

    def check_block_ids(self, step_id: int, ids: Iterable[int]) -> None:
        if any(not 0 <= b < self.num_blocks for b in ids):
            raise InvalidArgumentError(f"step {step_id}: block ids must lie in [0, {self.num_blocks})")
