"""Step plans send a sequence's data once, then diffs: plan bytes follow what changed, not the
context; a stage rebuilds every whole block table from them; and it refuses what it cannot place."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from tandem.coordinator import plans
from tandem.coordinator.scheduler import Sampled, Scheduler, Sequence
from tandem.core.errors import InvalidArgumentError
from tandem.core.wire.frames import HOSTED_SAMPLER
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.executor import StageExecutor
from tandem.stage_worker.runner import StageRunner
from tandem.stage_worker.tables import PlanTables
from tandem.v1 import common_pb2
from tandem.v1 import stage_worker_pb2 as pb


def commit_all(s: Scheduler, step) -> None:
    s.update(step.step_id, {x.request_id: Sampled(7) for x in step.sequences})


def decode_plan_bytes(context: int, num_seqs: int = 8) -> list[int]:
    """Serialized bytes of each of 20 decode steps' plans, `num_seqs` sequences of `context` prompt tokens."""
    s = Scheduler(num_blocks=num_seqs * 80, block_size=16, max_num_seqs=num_seqs,
                  max_num_batched_tokens=num_seqs * context, max_in_flight=1)
    table = plans.SamplerTable()
    for i in range(num_seqs):
        s.add(Sequence(f"request-{i}", [3 + (i * 7 + j) % 500 for j in range(context)], 100, sampler=f"s{i % 2}:1"))
    while s.waiting:  # the prompts (a burst into an idle pipeline goes in more than one step)
        prefill = s.schedule()
        plans.step_plan(prefill, table)
        commit_all(s, prefill)
    sizes = []
    for _ in range(20):
        step = s.schedule()
        sizes.append(len(plans.step_plan(step, table).SerializeToString()))
        commit_all(s, step)
    return sizes


def test_decode_plan_bytes_do_not_grow_with_context():
    short, long = decode_plan_bytes(100), decode_plan_bytes(1000)
    # per sequence, num_computed_tokens (and an appended block id) may take one more varint byte
    assert min(long) <= min(short) + 8 and max(long) <= max(short) + 2 * 8, (short, long)
    assert max(long) < 8 * 40  # a whole table of 63 block ids would be more than that per sequence


def test_samplers_go_once_by_address_then_by_index():
    s = Scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_in_flight=1)
    table = plans.SamplerTable()
    s.add(Sequence("a", [1, 2, 3], 100, sampler="10.0.0.1:7000"))
    s.add(Sequence("b", [1, 2, 3], 100, sampler="10.0.0.2:7000"))
    first = s.schedule()
    plan = plans.step_plan(first, table)
    assert list(plan.sampler_addresses) == ["10.0.0.1:7000", "10.0.0.2:7000"]
    assert [x.sampler_index for x in plan.sequences] == [0, 1]
    commit_all(s, first)
    plan = plans.step_plan(s.schedule(), table)
    assert not plan.sampler_addresses and [x.sampler_index for x in plan.sequences] == [0, 1]
    assert b"10.0.0" not in plan.SerializeToString()


@pytest.mark.parametrize("num_host_blocks", [64, 0], ids=["swap", "recompute"])
def test_a_stage_rebuilds_every_table_through_preemption(num_host_blocks):
    # Few blocks: sequences grow into each other and are preempted (swapped or recomputed), so
    # tables go whole, then as appends, then whole again; the stage's copy must always be the
    # coordinator's table.
    s = Scheduler(num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_in_flight=1,
                  num_host_blocks=num_host_blocks)
    sampler_table, stage = plans.SamplerTable(), PlanTables(num_blocks=12)
    for rid in "abcd":
        s.add(Sequence(rid, [5, 6, 7, 8, 9], 100, sampler="s0:1"))
    num_whole = num_appends = 0
    for _ in range(60):
        step = s.schedule()
        if step is None:
            break
        plan = pb.StepPlan.FromString(plans.step_plan(step, sampler_table).SerializeToString())  # over the wire
        resolved = stage.apply(plan)
        for x, table in zip(step.sequences, resolved.block_tables, strict=True):
            assert table == s.seqs[x.request_id].block_table, f"step {step.step_id}: {x.request_id}"
        num_whole += sum(bool(x.block_table) for x in plan.sequences)
        num_appends += sum(bool(x.new_block_ids) for x in plan.sequences)
        assert resolved.samplers == ["s0:1"] * len(plan.sequences)
        if step.sequences:
            commit_all(s, step)
    assert s.num_preemptions > 0 and num_appends > 0 and num_whole > 4  # some tables went whole again
    for rid in list(s.seqs):
        s.finish(rid)
    stage.apply(pb.StepPlan(step_id=10**6, finished_request_ids=s.schedule().finished_request_ids))
    assert stage.blocks_of == {}


def test_a_stage_refuses_an_append_without_a_table_and_a_sampler_outside_its_table():
    stage = PlanTables(num_blocks=8)
    with pytest.raises(InvalidArgumentError, match=r"step 3: request 'r1' appends to a block table this stage does not hold"):
        stage.apply(pb.StepPlan(step_id=3, sampler_addresses=["s0:1"], sequences=[
            pb.SequencePlan(request_id="r1", num_computed_tokens=4, input_ids=[9], new_block_ids=[2])]))
    with pytest.raises(InvalidArgumentError, match=r"step 4: request 'r2' names sampler 1, outside the stage's table of 1"):
        stage.apply(pb.StepPlan(step_id=4, sequences=[
            pb.SequencePlan(request_id="r2", input_ids=[9], block_table=[0], sampler_index=1)]))
    stage.apply(pb.StepPlan(step_id=5, sequences=[pb.SequencePlan(request_id="r3", input_ids=[9], block_table=[0])]))
    stage.apply(pb.StepPlan(step_id=6, finished_request_ids=["r3"]))
    with pytest.raises(InvalidArgumentError, match=r"step 7: request 'r3' appends"):  # finished: its table is gone
        stage.apply(pb.StepPlan(step_id=7, sequences=[pb.SequencePlan(request_id="r3", input_ids=[9])]))
    with pytest.raises(InvalidArgumentError, match=r"step 8: block ids must lie in \[0, 8\)"):
        stage.apply(pb.StepPlan(step_id=8, sequences=[pb.SequencePlan(request_id="r4", input_ids=[9], block_table=[8])]))


def test_the_executor_refuses_a_bad_plan_and_runs_a_diffed_one(checkpoint):
    executor = StageExecutor(StageWorkerConfig(model=str(checkpoint("llama")), num_blocks=8, block_size=4))
    with pytest.raises(InvalidArgumentError, match="step 1: request 'x' appends"):
        executor.prepare(pb.StepPlan(step_id=1, sampler_addresses=["s0:1"], sequences=[
            pb.SequencePlan(request_id="x", input_ids=[5], num_computed_tokens=3, new_block_ids=[1])]), {})
    prefill = pb.StepPlan(step_id=2, sequences=[pb.SequencePlan(request_id="a", input_ids=[5, 6, 7, 8], block_table=[3])])
    inputs = executor.prepare(prefill, {})
    assert inputs.samplers == ["s0:1"]
    executor.run(prefill, inputs, None)
    decode = pb.StepPlan(step_id=3, sequences=[
        pb.SequencePlan(request_id="a", input_ids=[9], num_computed_tokens=4, new_block_ids=[6], sample_index=1)])
    diffed = executor.run(decode, executor.prepare(decode, {}), None).logits
    assert executor.blocks_of == {"a": [3, 6]}
    # the same step with the whole table gives the same logits
    whole = pb.StepPlan(step_id=4, sequences=[
        pb.SequencePlan(request_id="a", input_ids=[9], num_computed_tokens=4, block_table=[3, 6], sample_index=1)])
    assert torch.equal(executor.run(whole, executor.prepare(whole, {}), None).logits, diffed)


def test_a_partial_prefill_is_computed_on_every_stage_and_sampled_by_no_one(checkpoint):
    s = Scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=6, max_in_flight=1)
    s.add(Sequence("a", [5, 6], 100, sampler="s0:1"))
    s.add(Sequence("b", list(range(10, 20)), 100, sampler="s1:1"))
    step = s.schedule()
    plan = pb.StepPlan.FromString(plans.step_plan(step, plans.SamplerTable()).SerializeToString())
    assert [(x.request_id, x.is_partial_prefill) for x in plan.sequences] == [("a", False), ("b", True)]
    assert {address: list(p.request_ids) for address, p in plans.sample_plans(step).items()} == {"s0:1": ["a"]}
    # The last stage computes b's chunk and gives logits for a's row alone; b's last chunk then
    # gives the logits its whole prompt gives in one step.
    executor = StageExecutor(StageWorkerConfig(model=str(checkpoint("llama")), num_blocks=16, block_size=4))
    assert [list(x.block_table) for x in plan.sequences] == [[0], [1]]
    out = executor.run(plan, executor.prepare(plan, {}), None)
    whole = pb.StepPlan(step_id=9, sampler_addresses=["s0:1"], sequences=[
        pb.SequencePlan(request_id="a2", input_ids=[5, 6], block_table=[12]),
        pb.SequencePlan(request_id="b2", input_ids=list(range(10, 20)), block_table=[13, 14, 15])])
    want = executor.run(whole, executor.prepare(whole, {}), None).logits
    assert out.logits.shape == (1, want.shape[1])
    torch.testing.assert_close(out.logits, want[:1])
    rest = pb.StepPlan(step_id=2, sequences=[pb.SequencePlan(
        request_id="b", input_ids=list(range(14, 20)), num_computed_tokens=4, new_block_ids=[2, 3])])
    torch.testing.assert_close(executor.run(rest, executor.prepare(rest, {}), None).logits, want[1:])


def test_a_stage_stream_opened_again_begins_with_the_sampler_table():
    from tandem.coordinator.ports import GrpcStage

    port = GrpcStage(0, "127.0.0.1:1", lambda event: None, is_last=True)  # never dialled: the stream is driven by hand
    first = [pb.StepPlan(step_id=1, sampler_addresses=["s0:1", "s1:1"]), pb.StepPlan(step_id=2)]
    assert list(port._with_sampler_table(iter(first))) == first
    (table, plan) = port._with_sampler_table(iter([pb.StepPlan(step_id=3)]))
    assert (table.step_id, list(table.sampler_addresses), not table.sequences) == (0, ["s0:1", "s1:1"], True)
    assert plan.step_id == 3
    port.channel.close()


class HiddenPeers:
    """A stage 0's peers that keep the steps whose activations it sent."""

    has_kv_store = False

    def __init__(self) -> None:
        self.follows_tokens = threading.Event()
        self.sent: queue.Queue[int] = queue.Queue()

    def connect(self, executor) -> None:
        pass

    def send_hidden(self, step_id: int, hidden: torch.Tensor) -> None:
        self.sent.put(step_id)

    def hops(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("stage_index", [0, 1])
def test_only_the_last_stage_answers_every_step(checkpoint, stage_index):
    """A stage before the last answers the plan stream only for the steps it failed."""
    model = str(checkpoint("llama"))
    config = StageWorkerConfig(model=model, stage_index=stage_index, num_stages=2, next_stage="127.0.0.1:1",
                               num_blocks=8, block_size=4, profile_at_startup=False, sample_on_stage=stage_index == 1)
    runner = StageRunner(config, HiddenPeers(), sample=lambda step_id, rids, indices, logits, tp, first: [(r, 1) for r in rids])
    runner.load()
    hidden = torch.zeros(4, runner.ready().model_config.hidden_size)
    try:
        done, epoch = runner.open_steps()
        good = pb.StepPlan(step_id=1, sampler_addresses=[HOSTED_SAMPLER], sequences=[
            pb.SequencePlan(request_id="a", input_ids=[5, 6, 7, 8], block_table=[3])])
        bad = pb.StepPlan(step_id=2, sequences=[pb.SequencePlan(request_id="x", input_ids=[5], num_computed_tokens=3,
                                                                new_block_ids=[1])])
        for plan in (good, bad):
            if stage_index == 1:
                runner.arrive(plan.step_id, hidden if plan is good else hidden[:1])
            runner.submit(plan, epoch)
        answers = [done.get(timeout=60) for _ in range(2 if stage_index == 1 else 1)]
        if stage_index == 0:
            assert runner.peers.sent.get(timeout=60) == 1  # step 1 went through: its activations were sent
            time.sleep(0.2)
            assert done.empty()
    finally:
        runner.close()
    assert [a.step_id for a in answers] == ([1, 2] if stage_index == 1 else [2])
    assert "appends" in answers[-1].error and answers[-1].error_code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert stage_index == 0 or (answers[0].error == "" and answers[0].forward_ns > 0)
