"""Decode chaining in the coordinator's pure scheduler: a micro-batch's next decode step planned
before its tokens exist (coordinator/chaining.py), and every way a chain ends."""

from __future__ import annotations

from tandem.coordinator import chaining
from tandem.coordinator.scheduler import Sampled, ScheduledSequence, Scheduler, Sequence, Status, Step
from tandem.coordinator.steps import InFlight

HOSTED = "stage-last:1"


def scheduler(**options) -> Scheduler:
    args = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_in_flight=2,
                chain_sampler=HOSTED, chain_steps=2)
    return Scheduler(**{**args, **options})


def seq(rid: str, prompt_len: int = 3, sampler: str = HOSTED, max_tokens: int = 100) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), max_tokens=max_tokens, sampler=sampler)


def rows(**tokens: int) -> dict[str, Sampled]:
    return {rid: Sampled(token) for rid, token in tokens.items()}


def decoding(s: Scheduler, *micro_batches: list[str]) -> list:
    """Prefill each micro-batch in a step of its own, commit them, and return the first decode steps."""
    prefills = []
    for ids in micro_batches:
        for rid in ids:
            s.add(seq(rid))
        prefills.append(s.schedule())
    for step in prefills:
        s.update(step.step_id, rows(**{x.request_id: 10 for x in step.sequences}))
    return [s.schedule() for _ in micro_batches]


def test_a_decode_step_is_continued_before_its_tokens_exist():
    s = scheduler()
    a, b = decoding(s, ["a1", "a2"], ["b1", "b2"])
    assert (a.input_step_id, b.input_step_id) == (0, 0)
    a2, b2 = s.schedule(), s.schedule()
    assert s.schedule() is None  # one continuation each: a micro-batch has at most two steps in flight
    assert (a2.input_step_id, b2.input_step_id) == (a.step_id, b.step_id)
    # one token a sequence, at the position after the one its step computes; its input comes from the stages
    assert [(x.request_id, x.input_ids, x.num_computed_tokens, x.sample_index) for x in a2.sequences] == [
        ("a1", [], 4, 2), ("a2", [], 4, 2)]
    assert s.seqs["a1"].chained_step_ids == [a2.step_id]
    # a's tokens commit; its continuation becomes an ordinary step in flight, and is continued in turn
    (first, _), _ = s.update(a.step_id, rows(a1=11, a2=12))
    assert first.output_ids == [10, 11] and first.status == Status.IN_FLIGHT and first.step_id == a2.step_id
    a3 = s.schedule()
    assert a3.input_step_id == a2.step_id and [x.sample_index for x in a3.sequences] == [3, 3]
    assert [x.num_computed_tokens for x in a3.sequences] == [5, 5]
    assert [seq.output_ids for seq, _ in s.update(a2.step_id, rows(a1=13, a2=14))] == [[10, 11, 13], [10, 12, 14]]


def test_a_chain_of_three_steps_in_flight_by_default():
    s = scheduler(chain_steps=chaining.STEPS_IN_FLIGHT, num_blocks=16, block_size=2)
    assert chaining.STEPS_IN_FLIGHT == 3
    a, b = decoding(s, ["a1", "a2"], ["b1", "b2"])  # 3 prompt tokens + 1 sampled: two blocks of 2 each
    a2, b2, a3, b3 = s.schedule(), s.schedule(), s.schedule(), s.schedule()
    assert s.schedule() is None  # three steps of each micro-batch in flight
    assert [x.input_step_id for x in (a2, b2, a3, b3)] == [a.step_id, b.step_id, a2.step_id, b2.step_id]
    # each continuation one position further on, with the block its position needs
    assert [(x.num_computed_tokens, x.sample_index, len(x.new_block_ids)) for x in a2.sequences] == [(4, 2, 1)] * 2
    assert [(x.num_computed_tokens, x.sample_index, len(x.new_block_ids)) for x in a3.sequences] == [(5, 3, 0)] * 2
    assert s.seqs["a1"].chained_step_ids == [a2.step_id, a3.step_id] and len(s.seqs["a1"].block_table) == 3
    assert s.can_schedule is False  # the continuations ride in their micro-batches' slots
    # a commits: a2 becomes the first step in flight, and a3 may be continued in turn
    (first, _), _ = s.update(a.step_id, rows(a1=11, a2=12))
    assert first.step_id == a2.step_id and first.chained_step_ids == [a3.step_id]
    a4 = s.schedule()
    assert a4.input_step_id == a3.step_id and [x.sample_index for x in a4.sequences] == [4, 4]
    # aborting a1 takes it out of every step it is in
    s.finish("a1")
    assert all("a1" not in s.in_flight[x.step_id].rows for x in (a2, a3, a4))
    for step, token in ((a2, 13), (a3, 14), (a4, 15)):
        s.update(step.step_id, rows(a1=0, a2=token))
    assert s.seqs["a2"].output_ids == [10, 12, 13, 14, 15] and s.seqs["a2"].status == Status.READY


def test_a_chain_leaves_out_a_sequence_its_steps_in_flight_take_to_its_last_token():
    s = scheduler(chain_steps=3)
    s.add(seq("a", max_tokens=3))
    for rid in ("b", "c", "d"):
        s.add(seq(rid))
    prefill = s.schedule()
    s.update(prefill.step_id, rows(a=1, b=2, c=3, d=4))  # a has 1 of its 3 tokens
    first, _ = s.schedule(), s.schedule()
    assert [x.request_id for x in first.sequences] == ["a", "b"]  # samples a's second token
    continued, _ = s.schedule(), s.schedule()
    assert [x.request_id for x in continued.sequences] == ["a", "b"]  # a's third and last
    assert [x.request_id for x in s.schedule().sequences] == ["b"]  # nothing left of a to sample


def test_a_continuation_gets_the_block_its_token_needs():
    s = scheduler()
    decoding(s, ["a"], ["b"])  # 3 prompt tokens + 1: a's first block (4 tokens) is full after this step
    assert s.seqs["a"].block_table and len(s.seqs["a"].block_table) == 1
    continuation = s.schedule()
    assert [(x.request_id, len(x.new_block_ids)) for x in continuation.sequences] == [("a", 1)]
    assert len(s.seqs["a"].block_table) == 2


def test_no_chain_while_anything_else_wants_a_step():
    s = scheduler()
    decoding(s, ["a"], ["b"])
    s.add(seq("late"))  # a prompt waits: the slots go to ordinary steps, which admit it
    assert s.schedule() is None
    other = scheduler(chain_sampler="")  # chaining off
    decoding(other, ["a"], ["b"])
    assert other.schedule() is None


def test_rows_of_another_sampler_do_not_chain_and_no_micro_batch_jumps_the_queue():
    s = scheduler()
    s.add(seq("a", sampler="replica:1"))
    s.add(seq("b"))
    s.update(s.schedule().step_id, rows(a=1, b=2))
    a, b = s.schedule(), s.schedule()
    assert [x.request_id for x in a.sequences] == ["a"]
    # a's step holds a row the last stage does not sample, and b's continuation would run on stage
    # 0 right after b, waiting for b's tokens while a's next step waits behind it: neither continues
    assert s.schedule() is None
    s.update(a.step_id, rows(a=3))  # a's next step is an ordinary one, and b's turn comes after it
    a2 = s.schedule()
    assert [x.request_id for x in a2.sequences] == ["a"] and not a2.input_step_id
    b2 = s.schedule()  # b's step is now the oldest without a continuation: it continues, after a's
    assert b2.input_step_id == b.step_id and s.schedule() is None


def test_an_uneven_micro_batch_is_left_to_the_ordinary_steps():
    seqs = {rid: seq(rid) for rid in ("a", "b", "c", "d", "e", "f")}
    for x in seqs.values():
        x.status = Status.IN_FLIGHT
    step = Step(7, [], [], [], [])
    for rid in ("a", "b", "c", "d", "e"):
        step.sequences.append(ScheduledSequence(rid, 3, [9], [], [], 1, HOSTED))
    record = InFlight.of(step)
    assert chaining.continued_rows(record, seqs, HOSTED, share=3.0) is None  # 5 rows where 3 is the share
    assert [x.request_id for x in chaining.continued_rows(record, seqs, HOSTED, share=5.5)] == ["a", "b", "c", "d", "e"]
    assert chaining.continued_rows(record, seqs, "elsewhere", share=5.0) is None
    record.rows.update({f"x{i}": None for i in range(31)})  # 36 rows: 4 over a share of 32 is too many, 1 is not
    seqs.update({f"x{i}": seq(f"x{i}") for i in range(31)})
    assert chaining.continued_rows(record, seqs, HOSTED, share=32.0) is None
    assert len(chaining.continued_rows(record, seqs, HOSTED, share=35.0)) == 36
    assert chaining.continued_rows(record, seqs, HOSTED, share=37.5) is None
    # a large micro-batch may be 3% off its share: 8 rows of 256
    big = Step(8, [], [], [], [])
    for i in range(264):
        seqs[f"y{i}"] = seq(f"y{i}")
        big.sequences.append(ScheduledSequence(f"y{i}", 3, [9], [], [], 1, HOSTED))
    assert len(chaining.continued_rows(InFlight.of(big), seqs, HOSTED, share=256.0)) == 264
    assert chaining.continued_rows(InFlight.of(big), seqs, HOSTED, share=255.0) is None


def test_a_sequence_at_its_last_token_is_left_out_and_one_that_ends_leaves_its_continuation():
    s = scheduler()
    s.add(seq("a", max_tokens=2))
    for rid in ("b", "c", "d"):
        s.add(seq(rid))
    prefill = s.schedule()
    s.update(prefill.step_id, rows(a=1, b=2, c=3, d=4))
    first, _ = s.schedule(), s.schedule()
    assert [x.request_id for x in first.sequences] == ["a", "b"]
    continued = s.schedule()
    assert [x.request_id for x in continued.sequences] == ["b"]  # a's step samples its last token
    commits = s.update(first.step_id, rows(a=5, b=6))
    assert [(seq.request_id, seq.status) for seq, _ in commits] == [("a", Status.READY), ("b", Status.IN_FLIGHT)]
    s.finish("a")
    assert s.finish("b") == []  # b ended (a stop token): its continuation has nothing left to wait for
    assert continued.step_id not in s.in_flight


def test_aborting_a_chained_sequence_frees_it_from_both_steps():
    s = scheduler()
    a, _ = decoding(s, ["a1", "a2"], ["b1", "b2"])
    a2 = s.schedule()
    free = s.blocks.num_free
    assert s.finish("a1") == []
    assert "a1" not in s.in_flight[a.step_id].rows and "a1" not in s.in_flight[a2.step_id].rows
    assert s.blocks.num_free > free
    commits = s.update(a.step_id, rows(a1=1, a2=2))  # a1's answer is ignored
    assert [seq.request_id for seq, _ in commits] == ["a2"]
    assert s.update(a2.step_id, rows(a1=3, a2=4))[0][0].output_ids == [10, 2, 4]


def test_a_failed_step_and_a_lost_stage_end_the_chain():
    s = scheduler()
    a, _ = decoding(s, ["a1"], ["b1"])
    a2, _ = s.schedule(), s.schedule()
    assert s.fail(a.step_id) == ["a1"]
    s.finish("a1")  # the engine ends the failed step's requests
    assert a2.step_id not in s.in_flight  # nothing of its continuation is left to wait for
    s.recompute_all()
    assert not s.in_flight and all(not x.chained_step_ids and x.status == Status.WAITING for x in s.seqs.values())
    assert s.can_schedule


def test_micro_batches_of_prefills_arriving_apart_are_evened_before_they_chain():
    """Prompts admitted in groups of 28 and 36 (as a burst reaches the coordinator) prefill in two
    micro-batches; decoding must not chain them as they are (every cycle would then wait for the
    36-row one), but even them out to 32 and 32 first, then chain."""
    s = scheduler(num_blocks=512, max_num_seqs=64, max_num_batched_tokens=256)
    in_flight = []
    for group, size in (("a", 28), ("b", 36)):
        for i in range(size):
            s.add(seq(f"{group}{i}"))
        in_flight.append(s.schedule())
    assert [len(x.sequences) for x in in_flight] == [28, 36]
    sizes = []
    for _ in range(12):  # the oldest step's tokens come back, then every step that can go out goes out
        done = in_flight.pop(0)
        s.update(done.step_id, rows(**{x.request_id: 7 for x in done.sequences}))
        while (step := s.schedule()) is not None:
            in_flight.append(step)
            sizes.append((len(step.sequences), bool(step.input_step_id)))
    assert sizes[-6:] == [(32, True)] * 6, sizes
    assert all(n in (28, 32, 36) or not chained for n, chained in sizes)
    assert not any(chained for n, chained in sizes if n != 32)
