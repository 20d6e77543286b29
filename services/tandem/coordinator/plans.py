"""A scheduler step as the wire messages that carry it: the stages' plan and each sampler's rows."""

from __future__ import annotations

from tandem.coordinator.steps import Step
from tandem.v1 import cpu_sampler_pb2
from tandem.v1 import stage_worker_pb2 as stage_pb


def step_plan(step: Step) -> stage_pb.StepPlan:
    """What every stage gets for a step, ahead of its activations."""
    plan = stage_pb.StepPlan(
        step_id=step.step_id,
        finished_request_ids=step.finished_request_ids,
        swap_out=[stage_pb.BlockTransfer(request_id=r, block_ids=b) for r, b in step.swap_out],
        swap_in=[stage_pb.BlockTransfer(request_id=r, block_ids=b) for r, b in step.swap_in],
    )
    add = plan.sequences.add  # built in place: a message passed to the constructor is copied
    for s in step.sequences:
        add(request_id=s.request_id, num_computed_tokens=s.num_computed_tokens, input_ids=s.input_ids,
            block_table=s.block_table, sample_index=s.sample_index, sampler=s.sampler)
    return plan


def sample_plans(step: Step) -> dict[str, cpu_sampler_pb2.SamplePlan]:
    """Each replica's rows of a step, by address, in plan order: the order of its logits rows."""
    plans: dict[str, cpu_sampler_pb2.SamplePlan] = {}
    for s in step.sequences:
        plan = plans.get(s.sampler)
        if plan is None:
            plan = plans[s.sampler] = cpu_sampler_pb2.SamplePlan(step_id=step.step_id)
        plan.request_ids.append(s.request_id)
        plan.sample_indices.append(s.sample_index)
    return plans
