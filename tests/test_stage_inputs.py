"""Token-safe input preparation: a slot's buffers are never rewritten under a running step."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from tandem.stage_worker.inputs import InputPreparer, Slot


@dataclass
class Plan:
    step_id: int


def fill(plan: Plan, slot: Slot) -> torch.Tensor:
    """Write the step id into the slot's reused buffer, as the executor writes token ids."""
    buffer = slot.buffers.setdefault("ids", torch.empty(64, dtype=torch.int64))
    buffer.fill_(plan.step_id)
    return buffer


@pytest.mark.parametrize("overlap", [True, False])
def test_a_buffer_is_not_rewritten_before_its_step_finishes(overlap):
    prep = InputPreparer(fill, num_slots=2, overlap=overlap)
    for step in range(1, 13):
        prep.submit(Plan(step))
    seen = []
    for step in range(1, 13):
        prepared = prep.next()
        assert prepared.plan.step_id == step and prepared.error is None
        time.sleep(0.01)  # "compute": the preparer runs ahead meanwhile, as far as the slots allow
        assert torch.equal(prepared.inputs, torch.full((64,), step)), f"step {step}'s inputs were overwritten"
        seen.append(prepared.slot.index)
        prep.release(prepared)
    prep.close()
    assert seen == [0, 1] * 6  # two versions, alternating


def test_preparation_runs_ahead_by_at_most_one_step():
    prepared_steps = []

    def record(plan: Plan, slot: Slot) -> int:
        prepared_steps.append(plan.step_id)
        return plan.step_id

    prep = InputPreparer(record, num_slots=2)
    for step in (1, 2, 3, 4):
        prep.submit(Plan(step))
    first = prep.next()
    deadline = time.monotonic() + 5
    while prepared_steps != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert prepared_steps == [1, 2], "step 3 was prepared while step 1 still held its slot"
    prep.release(first)
    second = prep.next()
    deadline = time.monotonic() + 5
    while len(prepared_steps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prepared_steps == [1, 2, 3] and second.plan.step_id == 2
    prep.close()


def test_an_error_preparing_a_step_is_handed_over_with_it():
    def failing(plan: Plan, slot: Slot):
        if plan.step_id == 2:
            raise ValueError("bad plan")
        return plan.step_id

    prep = InputPreparer(failing)
    for step in (1, 2, 3):
        prep.submit(Plan(step))
    results = []
    for _ in range(3):
        p = prep.next()
        results.append((p.plan.step_id, p.inputs, str(p.error) if p.error else None))
        prep.release(p)
    prep.close()
    assert results == [(1, 1, None), (2, None, "bad plan"), (3, 3, None)]
    assert prep.next() is None


def test_close_wakes_a_preparer_waiting_for_a_slot():
    prep = InputPreparer(lambda plan, slot: plan.step_id, num_slots=1)
    for step in (1, 2):
        prep.submit(Plan(step))
    held = prep.next()  # never released: the preparer waits for the only slot
    done = threading.Event()
    threading.Thread(target=lambda: (prep.close(), done.set()), daemon=True).start()
    assert done.wait(5)
    assert held.plan.step_id == 1
