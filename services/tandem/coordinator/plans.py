"""A scheduler step as the wire messages that carry it: the stages' plan and each sampler's rows."""

from __future__ import annotations

from tandem.coordinator.steps import Step
from tandem.core.wire import frames
from tandem.v1 import cpu_sampler_pb2
from tandem.v1 import stage_worker_pb2 as stage_pb


class SamplerTable:
    """The sampler replicas the stages know, by index. Append-only, so an index keeps its address
    for the life of the stages' streams; a replica that leaves the pool keeps its index, and one
    that comes back gets it again. The last stage's own sampler (at address `hosted`) is sent as
    frames.HOSTED_SAMPLER: the stage samples its rows itself."""

    def __init__(self, hosted: str = "") -> None:
        self.hosted = hosted
        self.addresses: list[str] = []
        self._index: dict[str, int] = {}
        self._num_sent = 0  # entries the stages have

    def index(self, address: str) -> int:
        i = self._index.get(address)
        if i is None:
            i = self._index[address] = len(self.addresses)
            self.addresses.append(frames.HOSTED_SAMPLER if address == self.hosted else address)
        return i

    def unsent(self) -> list[str]:
        """The whole table when it grew since it was last sent (then counted as sent), else []."""
        if len(self.addresses) == self._num_sent:
            return []
        self._num_sent = len(self.addresses)
        return self.addresses


def step_plan(step: Step, samplers: SamplerTable, traceparent: str = "") -> stage_pb.StepPlan:
    """What every stage gets for a step, ahead of its activations: per sequence its new tokens,
    its block table whole or the ids appended to it, and its sampler's index in `samplers`;
    the sampler table too when it grew; the step span's `traceparent` when it is traced."""
    plan = stage_pb.StepPlan(
        step_id=step.step_id,
        finished_request_ids=step.finished_request_ids,
        swap_out=[stage_pb.BlockTransfer(request_id=r, block_ids=b) for r, b in step.swap_out],
        swap_in=[stage_pb.BlockTransfer(request_id=r, block_ids=b) for r, b in step.swap_in],
        input_step_id=step.input_step_id,
    )
    add = plan.sequences.add  # built in place: a message passed to the constructor is copied
    for s in step.sequences:
        add(request_id=s.request_id, num_computed_tokens=s.num_computed_tokens, input_ids=s.input_ids,
            block_table=s.block_table, new_block_ids=s.new_block_ids, sample_index=s.sample_index,
            sampler_index=samplers.index(s.sampler), is_partial_prefill=s.is_partial_prefill)
    plan.sampler_addresses.extend(samplers.unsent())
    if traceparent:
        plan.traceparent = traceparent
    return plan


def sample_plans(step: Step, traceparent: str = "", hosted: str = "") -> dict[str, cpu_sampler_pb2.SamplePlan]:
    """Each replica's rows of a step, by address, in plan order: the order of its logits rows;
    each carries the step span's `traceparent` when the step is traced. Partial prefill chunks
    are not sampled: they are in no replica's plan; nor are the rows of the sampler the last
    stage hosts (at `hosted`), which it hands their request ids in-process."""
    plans: dict[str, cpu_sampler_pb2.SamplePlan] = {}
    for s in step.sequences:
        if s.is_partial_prefill or (hosted and s.sampler == hosted):
            continue
        plan = plans.get(s.sampler)
        if plan is None:
            plan = plans[s.sampler] = cpu_sampler_pb2.SamplePlan(step_id=step.step_id, traceparent=traceparent)
        plan.request_ids.append(s.request_id)
        plan.sample_indices.append(s.sample_index)
    return plans
