"""The coordinator's engine loop with fake stage, sampler and KV-store ports: no gRPC, no threads.

The test drives the loop turn by turn (`Engine.run_once`) and plays the samplers itself: a
sampler answers a row with `token(request, index)`, as a real one gives the same token for the
same (request, index) whichever replica samples it.
"""

from __future__ import annotations

import threading

import pytest

from tandem.coordinator.engine import Engine, Inbox, SamplingError
from tandem.coordinator.events import (
    Event,
    MembershipChanged,
    SamplerDown,
    SamplerUp,
    SequencesAdded,
    StageDown,
    StageUp,
    StepComputed,
    StepFailed,
    TokensSampled,
)
from tandem.coordinator.front import Chunk, TextStream
from tandem.coordinator.requests import End, Request
from tandem.coordinator.scheduler import Scheduler
from tandem.coordinator.stage_health import StageHealth
from tandem.core.errors import (
    AlreadyExistsError,
    ResourceExhaustedError,
    UnavailableError,
)
from tandem.core.sampling.options import SamplingOptions
from tandem.core.tokenizer import Tokenizer
from tandem.v1 import common_pb2, cpu_sampler_pb2

TOKENIZER = Tokenizer.from_dir(__import__("tandem.assets", fromlist=["x"]).__path__[0] + "/tiny")
EOS = 2
FINISH = common_pb2


def token(request_id: str, index: int) -> int:
    return 300 + (sum(map(ord, request_id)) * 31 + index * 7) % 3000  # word pieces of the tiny vocabulary


class FakeStage:
    def __init__(self) -> None:
        self.plans = []
        self.resets = self.watches = 0
        self.samplers: list[str] = []  # the sampler table the plans sent

    def send(self, plan) -> None:
        self.plans.append(plan)
        if plan.sampler_addresses:
            self.samplers = list(plan.sampler_addresses)

    def sampler(self, s) -> str:
        """The address of a SequencePlan's sampler."""
        return self.samplers[s.sampler_index]

    def reset(self) -> None:
        self.resets += 1

    def watch(self) -> None:
        self.watches += 1

    def close(self) -> None:
        pass


class FakeSampler:
    def __init__(self, address: str, post, add_error: str = ""):
        self.address, self.post, self.add_error = address, post, add_error
        self.held: dict[str, cpu_sampler_pb2.SamplerSequence] = {}
        self.plans, self.released, self.is_closed = [], [], False
        self.reconnects = 0
        self.added: list[str] = []  # every request id it was handed, in order

    def start(self) -> None:
        self.post(SamplerUp(self))

    def add(self, sequences) -> None:
        self.added += [s.request_id for s in sequences]
        if not self.add_error:
            self.held.update((s.request_id, s) for s in sequences)
        self.post(SequencesAdded(self, tuple(s.request_id for s in sequences), self.add_error))

    def release(self, request_ids) -> None:
        self.released += request_ids
        for rid in request_ids:
            self.held.pop(rid, None)

    def send_plan(self, plan) -> None:
        self.plans.append(plan)

    def reconnect(self) -> None:
        self.reconnects += 1  # a test posts SamplerUp when the replica is to answer again

    def close(self) -> None:
        self.is_closed = True

    def answer(self, step_id: int, rows: list[tuple[str, int]], error: str = "") -> None:
        tokens = [cpu_sampler_pb2.SampledToken(request_id=r, sample_index=i, token_id=token(r, i)) for r, i in rows]
        self.post(TokensSampled(self, cpu_sampler_pb2.SampledBatch(step_id=step_id, tokens=tokens, error=error)))


class FakeKvStore:
    def __init__(self) -> None:
        self.freed = []

    def free(self, request_ids) -> None:
        self.freed += request_ids

    def close(self) -> None:
        pass


class Rig:
    """An engine over fakes, turned by hand."""

    def __init__(self, samplers=("s0", "s1"), num_stages: int = 2, num_blocks: int = 64, num_host_blocks: int = 0,
                 max_in_flight: int = 3, max_queue: int = 64, step_timeout_s: float = 60.0, stage_health=None,
                 max_num_batched_tokens: int = 64, on_outputs=lambda requests: None, hosted: str = ""):
        self.inbox: Inbox = Inbox()
        self.hosted = hosted  # the address of the last stage's own sampler, if it hosts one
        self.stages = [FakeStage() for _ in range(num_stages)]
        self.samplers: dict[str, FakeSampler] = {}
        self.add_errors: dict[str, str] = {}
        self.kv_store = FakeKvStore()
        self.scheduler = Scheduler(num_blocks, 4, 8, max_num_batched_tokens, max_in_flight, num_host_blocks)
        self.engine = Engine(self.scheduler, self.stages, self.open_sampler, self.kv_store, self.inbox,
                             max_queue=max_queue, step_timeout_s=step_timeout_s, stage_health=stage_health,
                             on_outputs=on_outputs, hosted_sampler=hosted)
        self.answered: set[int] = set()
        self.post(MembershipChanged(frozenset(samplers)))
        self.turn()

    def open_sampler(self, address: str) -> FakeSampler:
        self.samplers[address] = FakeSampler(address, self.inbox.put, self.add_errors.get(address, ""))
        return self.samplers[address]

    def post(self, event: Event) -> None:
        self.inbox.put(event)

    def turn(self) -> None:
        """Run the loop until nothing is left to do."""
        self.engine.run_once()
        while not self.inbox.empty():
            self.engine.run_once()

    def request(self, rid: str, prompt=(5, 6, 7), max_tokens: int = 4, **params) -> Request:
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, **params)
        options = SamplingOptions.from_proto(sampling, TOKENIZER.vocab_size, max_tokens_limit=100)
        request = Request(request_id=rid, prompt_ids=list(prompt), max_tokens=max_tokens, params=sampling,
                          options=options, seed=1, eos_token_ids=frozenset({EOS}))
        self.engine.submit(request)
        return request

    def open_steps(self) -> list:
        """The plans sent and not yet answered by the samplers."""
        return [p for p in self.stages[0].plans if p.sequences and p.step_id not in self.answered]

    def answer(self, plan, skip=()) -> None:
        """The last stage has run a step, and each replica answers its rows of it (those in `skip`
        stay unanswered; partial prefill chunks have none)."""
        self.answered.add(plan.step_id)
        self.post(StepComputed(plan.step_id))
        by_sampler: dict[str, list] = {}
        for s in plan.sequences:
            if s.request_id not in skip and not s.is_partial_prefill:
                address = self.stages[0].sampler(s) or self.hosted  # the table's empty name: the stage's own
                by_sampler.setdefault(address, []).append((s.request_id, s.sample_index))
        for address, rows in by_sampler.items():
            self.samplers[address].answer(plan.step_id, rows)

    def run(self, max_turns: int = 100) -> None:
        """Answer every step until every request has ended."""
        for _ in range(max_turns):
            self.turn()
            steps = self.open_steps()
            if not steps:
                return
            for plan in steps:
                self.answer(plan)


def outputs(request: Request) -> list:
    """What the request's outputs hold: (token id, logprobs) pairs, then an End."""
    return request.outputs.take()


def tokens(request: Request) -> list[int]:
    return [o[0] for o in outputs(request) if not isinstance(o, End)]


def expected(rid: str, n: int) -> list[int]:
    return [token(rid, i) for i in range(n)]


def assert_all_released(rig: Rig) -> None:
    snapshot = rig.engine.snapshot
    assert (snapshot.num_running, snapshot.num_waiting, snapshot.num_blocks_used) == (0, 0, 0)
    assert not any(s.held for s in rig.samplers.values() if not s.is_closed)
    assert rig.scheduler.in_flight == {}


def test_tokens_commit_in_order_and_a_finished_request_is_released_everywhere():
    rig = Rig()
    a, b = rig.request("a", max_tokens=4), rig.request("b", max_tokens=2)
    rig.turn()
    assert {s.address for s in rig.samplers.values() if s.held} == {"s0", "s1"}  # least loaded first
    first = rig.open_steps()[0]
    assert [(s.request_id, list(s.input_ids), s.sample_index) for s in first.sequences] == [
        ("a", [5, 6, 7], 0), ("b", [5, 6, 7], 0)]
    rig.run()
    assert tokens(a) == expected("a", 4) and a.finish_reason == FINISH.FINISH_REASON_LENGTH
    assert tokens(b) == expected("b", 2) and b.output_ids == expected("b", 2)
    finished = [rid for p in rig.stages[1].plans for rid in p.finished_request_ids]
    assert sorted(finished) == ["a", "b"]  # every stage is told, with the next step
    assert sorted(r for s in rig.samplers.values() for r in s.released) == ["a", "b"]
    assert_all_released(rig)


def test_each_turn_hands_the_front_every_request_it_gave_outputs_at_once():
    given: list[dict[str, list]] = []  # per hand-over: what each request named in it had to take
    rig = Rig(samplers=("s0",), on_outputs=lambda requests: given.append({r.request_id: r.outputs.take() for r in requests}))
    a, b = rig.request("a", max_tokens=3), rig.request("b", max_tokens=2)
    rig.run()
    assert set(given[0]) == {"a", "b"}  # one step's tokens of both requests: one hand-over
    assert all(items for turn in given for items in turn.values())  # none names a request with nothing to take
    took = {rid: [item for turn in given for item in turn.get(rid, [])] for rid in "ab"}
    assert [t[0] for t in took["a"][:-1]] == expected("a", 3) and took["a"][-1] == End(FINISH.FINISH_REASON_LENGTH)
    assert [t[0] for t in took["b"][:-1]] == expected("b", 2) and took["b"][-1] == End(FINISH.FINISH_REASON_LENGTH)
    assert a.outputs.take() == [] and b.outputs.take() == []  # nothing was left behind unannounced


def test_a_stop_token_ends_a_request_and_the_rows_it_leaves_do_not_hold_others():
    rig = Rig(samplers=("s0",))
    stop = token("a", 1)
    a, b = rig.request("a", max_tokens=10, stop_token_ids=[stop]), rig.request("b", max_tokens=5)
    rig.run()
    assert tokens(a) == expected("a", 2) and a.finish_reason == FINISH.FINISH_REASON_STOP_TOKEN
    assert tokens(b) == expected("b", 5)
    assert_all_released(rig)


def test_abort_ends_a_request_in_flight_and_its_step_still_commits_the_others():
    rig = Rig(samplers=("s0",), max_in_flight=1)
    a, b = rig.request("a", max_tokens=10), rig.request("b", max_tokens=3)
    rig.turn()
    step = rig.open_steps()[0]
    rig.answer(step, skip={"a"})  # a's row is still out when the client leaves
    assert rig.engine.abort("a") and not rig.engine.abort("no-such-id")
    rig.run()
    assert outputs(a) == [End(FINISH.FINISH_REASON_ABORTED)] and a.output_ids == []
    assert tokens(b) == expected("b", 3)
    assert rig.samplers["s0"].released.count("a") == 1
    assert not rig.engine.abort("a")  # ended: the id is free again
    rig.request("a", max_tokens=1)
    rig.run()
    assert_all_released(rig)


def test_a_replica_that_goes_down_hands_its_sequences_over_and_unanswered_rows_run_again():
    undisturbed = Rig()
    wanted = {rid: undisturbed.request(rid, max_tokens=6) for rid in "abcd"}
    undisturbed.run()
    want = {rid: tokens(r) for rid, r in wanted.items()}

    rig = Rig(max_in_flight=1)
    requests = {rid: rig.request(rid, max_tokens=6) for rid in "abcd"}
    rig.run(max_turns=3)  # a few tokens each
    on_s0 = sorted(rig.samplers["s0"].held)
    rig.turn()
    before = {rid: len(requests[rid].output_ids) for rid in on_s0}
    step = rig.open_steps()[0]
    done_on_s0 = [s.request_id for s in step.sequences if rig.stages[0].sampler(s) == "s0"][:1]
    rig.answer(step, skip=set(on_s0) - set(done_on_s0))  # s0 answers one row, then dies
    rig.post(SamplerDown(rig.samplers["s0"], "its Results stream failed: UNAVAILABLE"))
    rig.turn()
    moved = rig.samplers["s1"].held
    assert set(on_s0) <= set(moved)
    for rid in on_s0:  # s1 got each moved sequence with its history, the row s0 answered included
        assert list(moved[rid].output_ids) == expected(rid, before[rid] + (rid in done_on_s0))
    rig.run()
    assert {rid: tokens(r) for rid, r in requests.items()} == want
    assert all(rig.stages[0].sampler(s) == "s1" for p in rig.stages[0].plans[-2:] for s in p.sequences)


def test_a_replica_removed_from_the_pool_is_closed_and_a_new_one_takes_over():
    rig = Rig(samplers=("s0",))
    a = rig.request("a", max_tokens=5)
    rig.run(max_turns=2)
    rig.post(MembershipChanged(frozenset({"s1"})))
    rig.run()
    assert rig.samplers["s0"].is_closed and rig.engine.snapshot.samplers == ("s1",)
    assert tokens(a) == expected("a", 5)
    assert_all_released(rig)


def test_a_failed_add_marks_the_replica_down_and_the_sequences_go_elsewhere():
    rig = Rig(samplers=())
    rig.add_errors["s0"] = "AddSequences failed: DEADLINE_EXCEEDED"
    rig.post(MembershipChanged(frozenset({"s0", "s1"})))
    rig.turn()
    requests = [rig.request(rid, max_tokens=3) for rid in "abcd"]
    rig.run()
    assert all(tokens(r) == expected(r.request_id, 3) for r in requests)
    assert rig.engine.snapshot.samplers == ("s1",)
    assert_all_released(rig)


def test_a_replica_down_for_a_failed_add_comes_back_once_it_answers_again():
    # A paused replica's AddSequences times out: it goes out of the pool, releases what it took
    # when it answers, and subscribes again; once it confirms, it takes sequences again.
    rig = Rig(samplers=())
    rig.add_errors["s0"] = "AddSequences failed: DEADLINE_EXCEEDED"
    rig.post(MembershipChanged(frozenset({"s0", "s1"})))
    rig.turn()
    first = [rig.request(rid, max_tokens=2) for rid in "ab"]
    rig.run()
    s0 = rig.samplers["s0"]
    handed = list(s0.added)
    assert handed and s0.reconnects == 1 and set(s0.released) == set(handed)
    assert rig.engine.snapshot.samplers == ("s1",)
    s0.add_error = ""  # it resumes, and its new subscription is confirmed
    rig.post(SamplerUp(s0))
    rig.run()
    assert sorted(rig.engine.snapshot.samplers) == ["s0", "s1"]
    later = [rig.request(rid, max_tokens=2) for rid in "cdef"]
    rig.run()
    assert set(s0.added[len(handed):]) & set("cdef")  # it takes sequences again
    assert all(tokens(r) == expected(r.request_id, 2) for r in first + later)
    assert_all_released(rig)


def test_argmax_rows_are_sampled_on_the_last_stage_and_every_other_row_on_the_replicas():
    rig = Rig(samplers=("s0", "s1"), hosted="stage-1")
    greedy = [rig.request(f"g{i}", max_tokens=3, temperature=0.0) for i in range(3)]
    others = [rig.request("t0", max_tokens=3, temperature=0.8), rig.request("t1", max_tokens=3, temperature=0.0, logprobs=1),
              rig.request("p", max_tokens=3, temperature=0.0, repetition_penalty=1.1)]
    rig.run()
    assert all(tokens(r) == expected(r.request_id, 3) for r in greedy + others)
    hosted, replicas = rig.samplers["stage-1"], (rig.samplers["s0"], rig.samplers["s1"])
    assert sorted(hosted.added) == ["g0", "g1", "g2"]
    assert sorted(rid for s in replicas for rid in s.added) == ["p", "t0", "t1"]
    # the stages know the hosted sampler by the empty name only; it gets no row plans (its rows
    # reach it in-process), and the replicas' plans hold only their own rows
    assert "stage-1" not in rig.stages[0].samplers and "" in rig.stages[0].samplers
    assert hosted.plans == []
    assert {rid for s in replicas for plan in s.plans for rid in plan.request_ids} == {"p", "t0", "t1"}
    assert_all_released(rig)


def test_the_hosted_sampler_outlives_membership_changes_and_stands_in_for_absent_replicas():
    rig = Rig(samplers=(), hosted="stage-1")
    a = rig.request("a", max_tokens=2, temperature=0.8)  # no replica: the stage samples it
    rig.run()
    assert tokens(a) == expected("a", 2) and rig.samplers["stage-1"].added == ["a"]
    rig.post(MembershipChanged(frozenset({"s0"})))  # discovery never lists the stage; it stays
    rig.turn()
    assert sorted(rig.engine.snapshot.samplers) == ["s0", "stage-1"]
    rig.post(SamplerDown(rig.samplers["stage-1"], "its Results stream failed: UNAVAILABLE"))
    b = rig.request("b", max_tokens=2, temperature=0.0)  # argmax-only, but the stage's sampler is down
    rig.run()
    assert rig.samplers["s0"].added == ["b"] and tokens(b) == expected("b", 2)
    assert_all_released(rig)


def test_without_a_replica_requests_wait_and_run_once_one_is_up():
    rig = Rig(samplers=())
    a = rig.request("a", max_tokens=2)
    rig.run()
    assert rig.open_steps() == [] and outputs(a) == []
    rig.post(MembershipChanged(frozenset({"s0"})))
    rig.run()
    assert tokens(a) == expected("a", 2)


def test_preemption_swaps_out_and_in_and_frees_the_kv_store_for_a_request_ended_while_swapped():
    # 4 blocks of 4 tokens: two 7-token prompts fit, and their first outputs; the second needs more.
    rig = Rig(samplers=("s0",), num_blocks=4, num_host_blocks=8, max_in_flight=1)
    requests = [rig.request(rid, prompt=(5, 6, 7, 8, 9, 10, 11), max_tokens=4) for rid in "ab"]
    for _ in range(2):
        rig.turn()
        rig.answer(rig.open_steps()[0])
    rig.turn()
    swap = [p for p in rig.stages[0].plans if p.swap_out]
    assert swap and rig.engine.snapshot.num_preemptions == 1
    victim = swap[0].swap_out[0].request_id
    rig.engine.abort(victim)
    rig.run()
    assert rig.kv_store.freed == [victim]
    survivor = next(r for r in requests if r.request_id != victim)
    assert tokens(survivor) == expected(survivor.request_id, 4)
    assert_all_released(rig)


def test_preempted_sequences_come_back_with_the_same_tokens():
    for num_host_blocks in (8, 0):  # swapped, then recomputed
        rig = Rig(samplers=("s0",), num_blocks=5, num_host_blocks=num_host_blocks)
        requests = [rig.request(rid, prompt=(5, 6, 7, 8, 9, 10, 11), max_tokens=8) for rid in "abc"]
        rig.run()
        assert rig.engine.snapshot.num_preemptions > 0
        assert all(tokens(r) == expected(r.request_id, 8) for r in requests)
        assert_all_released(rig)


def test_a_failed_or_timed_out_step_fails_its_requests_and_sampling_errors_fail_theirs():
    rig = Rig(samplers=("s0",), max_in_flight=1)
    a = rig.request("a")
    rig.turn()
    failed = rig.open_steps()[0]
    rig.answered.add(failed.step_id)
    rig.post(StepFailed(failed.step_id, 1, "names sampler 'x:1'", common_pb2.ERROR_CODE_INVALID_ARGUMENT))
    rig.turn()
    end = outputs(a)[-1]
    assert isinstance(end.error, UnavailableError) and f"stage 1 failed step {failed.step_id} (INVALID_ARGUMENT)" in str(end.error)

    b = rig.request("b")
    rig.turn()
    step = rig.open_steps()[0]
    rig.answered.add(step.step_id)
    rig.samplers["s0"].answer(step.step_id, [], error="row 0: logits are NaN")
    rig.turn()
    assert isinstance(outputs(b)[-1].error, SamplingError)
    assert_all_released(rig)

    rig = Rig(samplers=("s0",), step_timeout_s=0.0)
    c = rig.request("c")
    rig.turn()
    rig.turn()
    message = str(outputs(c)[-1].error)
    assert "the pipeline failed step" in message and "(DEADLINE_EXCEEDED): no result within" in message
    assert "stage -1" not in message


def test_concurrent_submits_with_one_id_accept_exactly_one():
    rig = Rig()
    num_threads, results = 16, []
    barrier = threading.Barrier(num_threads)

    def submit() -> None:
        barrier.wait()
        try:
            rig.request("same-id")
            results.append("accepted")
        except AlreadyExistsError:
            results.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["accepted"] + ["refused"] * (num_threads - 1)
    rig.run()
    rig.request("same-id")  # free again once it ended


def test_a_full_queue_refuses_with_resource_exhausted():
    rig = Rig(max_queue=2)
    rig.request("a")
    rig.request("b")
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        rig.engine.check_admission()  # what the front asks before it tokenizes a prompt
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        rig.request("c")
    rig.run()
    rig.engine.check_admission()
    rig.request("c")


def test_the_front_makes_the_text_and_a_stop_string_it_finds_ends_the_request_in_the_engine():
    rig = Rig(samplers=("s0",))
    free = rig.request("x", max_tokens=8)
    rig.run()
    whole = TextStream(free, TOKENIZER.detokenizer([5, 6, 7]))
    streamed = ""
    while not whole.is_finished:
        streamed += whole.take().text
    assert whole.output_ids == expected("x", 8) and streamed == whole.text
    assert whole.finish_reason == FINISH.FINISH_REASON_LENGTH and whole.text == TOKENIZER.decode(
        [5, 6, 7] + whole.output_ids)[len(TOKENIZER.decode([5, 6, 7])):]
    stop = next(s for s in (whole.text[i:i + 2] for i in range(2, len(whole.text))) if s.strip() and s in whole.text)

    request = rig.request("x", max_tokens=8, stop=[stop])  # the id is free again: the same tokens
    text = TextStream(request, TOKENIZER.detokenizer([5, 6, 7]))
    seen = ""
    while not text.is_finished:
        rig.run(max_turns=1)
        rig.turn()  # commits the answers: the next token is out
        seen += (text.take() or Chunk([], "", [])).text
    assert text.finish_reason == FINISH.FINISH_REASON_STOP_SEQUENCE, (whole.text, stop, text.text, seen)
    assert seen == text.text == whole.text[: whole.text.index(stop)]
    assert rig.engine.abort("x", FINISH.FINISH_REASON_STOP_SEQUENCE)  # what the servicer does then
    rig.run()
    assert_all_released(rig)


# --- a stage that dies and comes back --------------------------------------------------------

def test_a_stage_that_comes_back_recomputes_every_sequence_with_the_same_tokens():
    rig = Rig(samplers=("s0",), max_in_flight=1)
    a, b = rig.request("a", max_tokens=6), rig.request("b", prompt=(9, 8, 7, 6, 5), max_tokens=6)
    for _ in range(3):  # prefill and two decode steps
        rig.turn()
        rig.answer(rig.open_steps()[0])
    rig.turn()
    lost = rig.open_steps()[0]  # in flight when stage 1 dies: its rows are never answered
    rig.answered.add(lost.step_id)
    rig.post(StageDown(1, "UNAVAILABLE: connection reset"))
    rig.turn()
    assert [s.resets for s in rig.stages] == [1, 1] and [s.watches for s in rig.stages] == [0, 1]
    assert rig.open_steps() == []  # nothing runs while a stage is down
    rig.post(StageUp(1))
    rig.turn()
    replay = rig.open_steps()[0]
    # Both recompute from the start, with the tokens they were given so far, before anything else.
    assert [(s.request_id, s.num_computed_tokens, list(s.input_ids)) for s in replay.sequences] == [
        ("a", 0, [5, 6, 7, *expected("a", 3)]), ("b", 0, [9, 8, 7, 6, 5, *expected("b", 3)])]
    rig.run()
    assert tokens(a) == expected("a", 6) and tokens(b) == expected("b", 6)
    assert_all_released(rig)


def test_without_recovery_a_stage_failure_fails_its_requests():
    rig = Rig(samplers=("s0",), stage_health=StageHealth(timeout_s=15.0, recover=False))
    a = rig.request("a")
    rig.turn()
    rig.post(StageDown(0, "UNAVAILABLE: connection reset"))
    rig.turn()
    end = outputs(a)[-1]
    assert isinstance(end.error, UnavailableError) and "stage 0 is down" in str(end.error)
    assert_all_released(rig)


def test_a_stage_down_too_long_fails_everything_and_refuses_until_it_is_back():
    rig = Rig(samplers=("s0",), stage_health=StageHealth(timeout_s=0.0, recover=True))
    a = rig.request("a")
    rig.turn()
    rig.post(StageDown(1, "DEADLINE_EXCEEDED"))
    rig.turn()
    rig.turn()
    assert isinstance(outputs(a)[-1].error, UnavailableError)
    with pytest.raises(UnavailableError, match="stage 1 is down"):
        rig.request("b")
    rig.post(StageUp(1))
    rig.turn()
    c = rig.request("c", max_tokens=2)
    rig.run()
    assert tokens(c) == expected("c", 2)
    assert_all_released(rig)


def test_a_long_prompt_is_prefilled_in_chunks_beside_decodes_and_its_sampler_sees_only_its_last():
    rig = Rig(samplers=("s0",), max_num_batched_tokens=4)
    a = rig.request("a", prompt=(5, 6), max_tokens=8)
    rig.turn()
    rig.answer(rig.open_steps()[0])  # a's prefill
    rig.turn()
    b = rig.request("b", prompt=tuple(range(10, 21)), max_tokens=2)
    rig.run()
    assert tokens(a) == expected("a", 8) and tokens(b) == expected("b", 2)
    b_rows = [s for p in rig.stages[0].plans for s in p.sequences if s.request_id == "b"]
    prefill = [s for s in b_rows if s.sample_index == 0]
    assert sum(len(s.input_ids) for s in prefill) == 11 and len(prefill) > 1
    assert [s.is_partial_prefill for s in prefill] == [True] * (len(prefill) - 1) + [False]
    assert any(len(p.sequences) == 2 and p.sequences[1].is_partial_prefill for p in rig.stages[0].plans)  # a decode beside a chunk
    assert all(sum(len(s.input_ids) for s in p.sequences) <= 4 for p in rig.stages[0].plans)
    sampled = [(rid, i) for p in rig.samplers["s0"].plans for rid, i in zip(p.request_ids, p.sample_indices)]
    assert sampled.count(("b", 0)) == 1 and len(sampled) == len(set(sampled))  # no row twice, no chunk
    assert_all_released(rig)


def test_a_chunk_only_step_commits_when_the_last_stage_has_run_it_and_a_lost_one_fails_its_request():
    rig = Rig(samplers=("s0",), max_num_batched_tokens=4)
    a = rig.request("a", prompt=tuple(range(10, 20)), max_tokens=2)
    rig.turn()
    (first,) = rig.open_steps()
    assert [s.is_partial_prefill for s in first.sequences] == [True] and rig.samplers["s0"].plans == []
    rig.turn()
    assert rig.open_steps() == [first]  # nothing more of a until its chunk is computed
    rig.answer(first)
    rig.turn()
    (second,) = rig.open_steps()
    assert second.sequences[0].num_computed_tokens == 4
    rig.post(StepFailed(second.step_id, 1, "boom"))
    rig.turn()
    assert a.finish_reason == FINISH.FINISH_REASON_ERROR and "boom" in str(outputs(a)[-1].error)
    assert_all_released(rig)
