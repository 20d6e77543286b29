"""The coordinator's pure scheduler: token safety, sampler-less sequences, lost rows, preemption."""

from __future__ import annotations

from tandem.coordinator.scheduler import Sampled, Scheduler, Sequence, Status


def scheduler(**options) -> Scheduler:
    args = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_in_flight=3)
    return Scheduler(**{**args, **options})


def seq(rid: str, prompt_len: int = 5, sampler: str = "s0") -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), max_tokens=100, sampler=sampler)


def rows(**tokens: int) -> dict[str, Sampled]:
    return {rid: Sampled(token) for rid, token in tokens.items()}


def test_a_sequence_is_in_one_step_at_a_time_and_decodes_after_its_commit():
    s = scheduler()
    s.add(seq("a"))
    first = s.schedule()
    assert [x.input_ids for x in first.sequences] == [[1, 2, 3, 4, 5]]
    assert s.schedule() is None  # a's token is not committed yet: it cannot run again
    assert s.update(first.step_id, rows(a=42))[0][0].output_ids == [42]
    second = s.schedule()
    assert [(x.input_ids, x.num_computed_tokens, x.sample_index) for x in second.sequences] == [([42], 5, 1)]


def test_a_sequence_without_a_sampler_waits():
    s = scheduler()
    s.add(seq("a", sampler=""))
    assert s.schedule() is None
    s.seqs["a"].sampler = "s1"
    assert [x.sampler for x in s.schedule().sequences] == ["s1"]


def test_retried_rows_run_the_same_tokens_again():
    s = scheduler(max_in_flight=1)
    s.add(seq("a"))
    s.add(seq("b"))
    prefill = s.schedule()
    s.update(prefill.step_id, rows(a=7, b=8))
    decode = s.schedule()
    assert sorted(x.request_id for x in decode.sequences) == ["a", "b"]
    assert s.retry(["b"]) == []  # b's sampler went away before answering
    s.max_in_flight = 2
    again = s.schedule()
    # the stages hold b's table from its prefill: nothing of it is sent again
    assert [(x.request_id, x.input_ids, x.sample_index, x.block_table, x.new_block_ids) for x in again.sequences] == [
        ("b", [8], 1, [], [])]
    assert s.update(decode.step_id, rows(a=9))[0][0].output_ids == [7, 9]
    assert s.update(again.step_id, rows(b=10))[0][0].output_ids == [8, 10]


def test_a_retried_prefill_queues_again_first_and_keeps_its_blocks():
    s = scheduler()
    s.add(seq("a", prompt_len=6))
    s.schedule()
    blocks = list(s.seqs["a"].block_table)
    s.add(seq("b"))
    s.retry(["a"])
    assert s.seqs["a"].status == Status.WAITING
    again = s.schedule()
    assert [x.request_id for x in again.sequences] == ["a", "b"]
    assert again.sequences[0].input_ids == [1, 2, 3, 4, 5, 6] and s.seqs["a"].block_table == blocks
    assert (again.sequences[0].block_table, again.sequences[0].new_block_ids) == ([], [])  # the stages hold it
    assert s.blocks.num_free == 64 - 2 - 2


def test_preemption_swaps_when_the_host_has_room_else_recomputes():
    s = scheduler(num_blocks=4, num_host_blocks=2)
    s.add(seq("a", prompt_len=8))  # 2 blocks
    s.add(seq("b", prompt_len=8))  # 2 blocks
    step = s.schedule()
    s.update(step.step_id, rows(a=1, b=2))
    grown = s.schedule()  # a needs a third block: b (the newest idle) is swapped out
    assert grown.swap_out == [("b", [2, 3])] and s.seqs["b"].status == Status.SWAPPED
    assert s.num_preemptions == 1


def test_a_step_commits_once_every_row_is_in_and_an_ended_row_does_not_hold_it():
    s = scheduler(max_in_flight=1)
    for rid in "abc":
        s.add(seq(rid))
    step = s.schedule()
    assert s.update(step.step_id, rows(a=1)) == []  # one sampler answered; the other has not
    assert s.update(step.step_id, rows(a=99)) == []  # a row answered twice keeps its first token
    assert s.sampled_token("a") == 1 and s.unanswered(step.step_id) == ["b", "c"]
    assert s.finish("c") == []  # c ended (aborted): the step no longer waits for it
    commits = s.update(step.step_id, rows(b=2, c=3))
    assert [(q.request_id, q.output_ids, row.token_id) for q, row in commits] == [("a", [1], 1), ("b", [2], 2)]
    assert s.in_flight == {} and s.schedule().finished_request_ids == ["c"]


def test_finishing_the_last_unanswered_row_commits_the_rest_and_a_lost_step_returns_its_rows():
    s = scheduler(max_in_flight=2)
    s.add(seq("a"))
    s.add(seq("b"))
    first = s.schedule()
    s.update(first.step_id, rows(a=1))
    assert [q.request_id for q, _ in s.finish("b")] == ["a"]
    s.add(seq("c"))
    second = s.schedule()
    assert sorted(x.request_id for x in second.sequences) == ["a", "c"]
    assert s.expired(sent_before=0.0) == [] and s.expired(sent_before=float("inf")) == [second.step_id]
    assert s.fail(second.step_id) == [x.request_id for x in second.sequences] and s.in_flight == {}


# --- prefix caching -------------------------------------------------------------------------

def prompt_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, max_tokens=100, sampler="s0")


def run_prefill(s: Scheduler, rid: str) -> list[int]:
    """Schedule and commit one step holding `rid`'s prefill; its block table."""
    step = s.schedule()
    (row,) = [x for x in step.sequences if x.request_id == rid]
    s.update(step.step_id, rows(**{x.request_id: 0 for x in step.sequences}))
    return row.block_table


def test_a_prompt_starts_from_its_cached_prefix():
    s = scheduler()
    s.add(prompt_seq("a", list(range(1, 11))))  # blocks of 4: [1-4] [5-8] and 9, 10
    a_blocks = run_prefill(s, "a")
    s.add(prompt_seq("b", [*range(1, 9), 50, 51, 52]))
    step = s.schedule()
    (b,) = [x for x in step.sequences if x.request_id == "b"]
    assert (b.num_computed_tokens, b.input_ids, b.block_table[:2]) == (8, [50, 51, 52], a_blocks[:2])
    assert len(b.block_table) == 3 and b.block_table[2] not in a_blocks
    assert (s.blocks.num_queried_tokens, s.blocks.num_hit_tokens) == (9 + 10, 8)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = scheduler()
    s.add(prompt_seq("a", list(range(1, 9))))
    run_prefill(s, "a")
    s.add(prompt_seq("b", list(range(1, 9))))
    (b,) = [x for x in s.schedule().sequences if x.request_id == "b"]
    # 7 tokens are looked up (the last must be computed for its logits): one full block hits.
    assert (b.num_computed_tokens, b.input_ids) == (4, [5, 6, 7, 8])


def test_cached_blocks_outlive_their_request_and_a_retried_cached_prefill_queues_again():
    s = scheduler()
    s.add(prompt_seq("a", list(range(1, 10))))
    a_blocks = run_prefill(s, "a")
    s.finish("a")
    assert s.blocks.num_free == 64  # free to take, and still cached
    s.add(prompt_seq("c", [*range(1, 9), 20, 21, 22]))
    (c,) = s.schedule().sequences
    assert (c.num_computed_tokens, c.input_ids, c.block_table[:2]) == (8, [20, 21, 22], a_blocks[:2])
    s.retry(["c"])  # its sampler went away: the prefill queues again, first, keeping its blocks
    assert s.seqs["c"].status == Status.WAITING and s.waiting[0] == "c"
    (again,) = s.schedule().sequences
    assert (again.num_computed_tokens, again.input_ids, again.block_table) == (8, [20, 21, 22], [])  # sent with c
    assert s.seqs["c"].block_table == c.block_table


def test_without_prefix_caching_every_prompt_is_computed():
    s = scheduler(prefix_caching=False)
    s.add(prompt_seq("a", list(range(1, 10))))
    run_prefill(s, "a")
    s.add(prompt_seq("b", list(range(1, 10))))
    (b,) = [x for x in s.schedule().sequences if x.request_id == "b"]
    assert b.num_computed_tokens == 0 and s.blocks.num_hit_tokens == 0


def test_a_prompt_waiting_for_blocks_is_counted_in_the_cache_statistics_once():
    s = scheduler(num_blocks=3)
    s.add(prompt_seq("a", list(range(1, 10))))  # 3 blocks: the pool is full
    run_prefill(s, "a")
    s.add(prompt_seq("b", list(range(1, 10))))
    steps = [s.schedule() for _ in range(3)]  # a decodes; b cannot get a block while a holds all three
    assert all("b" not in {x.request_id for x in step.sequences} for step in steps if step is not None)
    assert (s.blocks.num_queried_tokens, s.blocks.num_hit_tokens) == (8, 0)  # a's lookup alone
    s.finish("a")
    (b,) = [x for x in s.schedule().sequences if x.request_id == "b"]
    assert b.num_computed_tokens == 8 and (s.blocks.num_queried_tokens, s.blocks.num_hit_tokens) == (16, 8)
