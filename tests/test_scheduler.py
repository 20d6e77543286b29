"""The coordinator's pure scheduler: token safety, sampler-less sequences, lost rows, preemption,
prefix caching, and how a step's token budget is spent (decodes first, prefills in chunks)."""

from __future__ import annotations

from tandem.coordinator.budget import MIN_FILL_STEP_TOKENS, fill_step_budget, num_decodes, prefill_chunk
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


# --- the token budget and chunked prefill ---------------------------------------------------

def held_blocks(s: Scheduler) -> set[int]:
    return {b for q in s.seqs.values() for b in q.block_table}


def assert_blocks_accounted(s: Scheduler) -> None:
    """Every block is held by a live sequence, or free (cached blocks nobody holds count as free)."""
    assert s.blocks.num_blocks - s.blocks.num_free == len(held_blocks(s))


def test_a_prefill_takes_what_the_budget_leaves_in_chunks_or_whole_without_chunking():
    assert prefill_chunk(10, budget=4, chunked=True, step_is_empty=True) == 4
    assert prefill_chunk(3, budget=4, chunked=True, step_is_empty=False) == 3
    assert prefill_chunk(10, budget=0, chunked=True, step_is_empty=False) == 0
    assert prefill_chunk(10, budget=4, chunked=False, step_is_empty=False) == 0  # waits for a step of its own
    assert prefill_chunk(10, budget=4, chunked=False, step_is_empty=True) == 10  # and there runs whole
    assert prefill_chunk(4, budget=4, chunked=False, step_is_empty=False) == 4


def test_decodes_take_their_share_of_the_micro_batches_within_rows_and_budget():
    assert num_decodes(6, 0, max_in_flight=3, max_num_seqs=8, budget=64) == 2  # 6 ready over 3 micro-batches
    assert num_decodes(4, 2, max_in_flight=3, max_num_seqs=8, budget=64) == 2
    assert num_decodes(1, 8, max_in_flight=3, max_num_seqs=8, budget=64) == 1  # never more than are ready
    assert num_decodes(30, 0, max_in_flight=1, max_num_seqs=8, budget=64) == 8
    assert num_decodes(30, 0, max_in_flight=1, max_num_seqs=64, budget=5) == 5


def test_a_burst_into_an_idle_pipeline_is_spread_over_micro_batches():
    s = scheduler(num_blocks=1024, max_num_seqs=64, max_num_batched_tokens=4096, max_in_flight=2, prefix_caching=False)
    for i in range(64):
        s.add(seq(f"r{i}", prompt_len=32))
    first, second = s.schedule(), s.schedule()
    # a quarter of the prompt tokens waiting each (2,048, then 1,536), not all of them in one micro-batch
    assert [sum(len(x.input_ids) for x in step.sequences) for step in (first, second)] == [512, 384]
    prompt_tokens = [512, 384]
    for done in (first, second):  # its prompts decode from now on
        s.update(done.step_id, rows(**{x.request_id: 1 for x in done.sequences}))
        step = s.schedule()
        prompt_tokens.append(sum(len(x.input_ids) for x in step.sequences if len(x.input_ids) > 1))
    # 36 prompts wait and 16 decode: a quarter again (288); then 27 wait and 28 decode: the whole budget
    assert prompt_tokens == [512, 384, 288, 27 * 32]
    assert fill_step_budget(4096, 100, 2) == MIN_FILL_STEP_TOKENS and fill_step_budget(200, 10_000, 2) == 200


def test_a_long_prompt_is_prefilled_in_chunks_and_only_its_last_chunk_is_sampled():
    s = scheduler(max_num_batched_tokens=4)
    s.add(seq("a", prompt_len=10))
    first = s.schedule()
    (x,) = first.sequences
    assert (x.num_computed_tokens, x.input_ids, x.is_partial_prefill, x.sample_index) == (0, [1, 2, 3, 4], True, 0)
    assert len(x.block_table) == 1  # blocks for the chunk only
    assert s.unanswered(first.step_id) == [] and s.schedule() is None  # in one step at a time
    assert s.update(first.step_id, rows(a=99)) == []  # not a sampled row: an answer for it is ignored
    assert s.computed(first.step_id) == [] and s.seqs["a"].status == Status.PREFILLING
    assert s.seqs["a"].num_computed_tokens == 4 and s.seqs["a"].output_ids == [] and s.in_flight == {}
    second = s.schedule()
    (x,) = second.sequences
    assert (x.num_computed_tokens, x.input_ids, x.is_partial_prefill, x.block_table) == (4, [5, 6, 7, 8], True, [])
    assert len(x.new_block_ids) == 1
    s.computed(second.step_id)
    last = s.schedule()
    (x,) = last.sequences
    assert (x.num_computed_tokens, x.input_ids, x.is_partial_prefill, x.sample_index) == (8, [9, 10], False, 0)
    assert s.unanswered(last.step_id) == ["a"]
    assert s.computed(last.step_id) == []  # a sampled row waits for its token
    (commit,) = s.update(last.step_id, rows(a=42))
    assert commit[0].output_ids == [42] and s.seqs["a"].num_computed_tokens == 10
    (decode,) = s.schedule().sequences
    assert (decode.input_ids, decode.sample_index) == ([42], 1)
    assert_blocks_accounted(s)


def test_decodes_go_first_and_a_prefill_chunk_fills_the_rest_of_the_budget():
    s = scheduler(max_num_batched_tokens=6, max_in_flight=1, prefix_caching=False)  # the prompts share tokens
    s.add(seq("a", prompt_len=3))
    s.add(seq("b", prompt_len=3))
    first = s.schedule()
    s.update(first.step_id, rows(a=1, b=2))
    s.add(seq("c", prompt_len=20))
    mixed = s.schedule()
    assert [(x.request_id, len(x.input_ids), x.is_partial_prefill) for x in mixed.sequences] == [
        ("a", 1, False), ("b", 1, False), ("c", 4, True)]
    assert s.computed(mixed.step_id) == []  # the decodes' tokens are not in yet
    assert [q.request_id for q, _ in s.update(mixed.step_id, rows(a=3, b=4))] == ["a", "b"]
    assert s.seqs["c"].num_computed_tokens == 4
    s.add(seq("d", prompt_len=5))
    # the next chunk of c comes before the waiting d, which gets what is left
    step = s.schedule()
    assert [(x.request_id, x.num_computed_tokens, len(x.input_ids)) for x in step.sequences] == [
        ("a", 4, 1), ("b", 4, 1), ("c", 4, 4)]
    s.computed(step.step_id)
    s.update(step.step_id, rows(a=5, b=6))
    s.finish("a")
    s.finish("b")
    step = s.schedule()
    assert [(x.request_id, x.num_computed_tokens, len(x.input_ids), x.is_partial_prefill) for x in step.sequences] == [
        ("c", 8, 6, True)]
    s.computed(step.step_id)
    step = s.schedule()
    assert [(x.request_id, len(x.input_ids), x.is_partial_prefill) for x in step.sequences] == [
        ("c", 6, False)]  # c's last chunk; d waits for budget
    s.update(step.step_id, rows(c=7))
    step = s.schedule()
    assert [(x.request_id, len(x.input_ids), x.is_partial_prefill) for x in step.sequences] == [
        ("c", 1, False), ("d", 5, False)]
    assert_blocks_accounted(s)


def test_without_chunked_prefill_a_long_prompt_runs_whole_and_alone():
    s = scheduler(max_num_batched_tokens=4, max_in_flight=1, chunked_prefill=False)
    s.add(seq("a", prompt_len=3))
    first = s.schedule()
    s.update(first.step_id, rows(a=1))
    s.add(seq("b", prompt_len=10))
    decode = s.schedule()
    assert [x.request_id for x in decode.sequences] == ["a"]  # b does not fit beside it
    s.update(decode.step_id, rows(a=2))
    s.finish("a")
    (whole,) = s.schedule().sequences
    assert (whole.request_id, len(whole.input_ids), whole.is_partial_prefill) == ("b", 10, False)


def test_a_partly_prefilled_sequence_is_preempted_by_recompute_and_starts_over():
    s = scheduler(num_blocks=4, num_host_blocks=8, max_num_batched_tokens=4, max_in_flight=1, prefix_caching=False)
    s.add(seq("a", prompt_len=6))  # 2 blocks
    s.add(seq("b", prompt_len=12))  # 3 blocks, in chunks of what the budget leaves
    step = s.schedule()
    assert [(x.request_id, len(x.input_ids)) for x in step.sequences] == [("a", 4)]
    s.computed(step.step_id)
    step = s.schedule()
    assert [(x.request_id, len(x.input_ids), x.is_partial_prefill) for x in step.sequences] == [
        ("a", 2, False), ("b", 2, True)]
    s.computed(step.step_id)
    s.update(step.step_id, rows(a=1))
    step = s.schedule()  # a decodes; b's next chunk needs more blocks than are free
    s.computed(step.step_id)
    s.update(step.step_id, rows(a=2))
    while s.seqs["b"].status != Status.WAITING:  # a grows into b's blocks: b is recomputed, never swapped
        step = s.schedule()
        assert step.swap_out == []
        s.computed(step.step_id)
        s.update(step.step_id, rows(**{x.request_id: 3 for x in step.sequences if not x.is_partial_prefill}))
        assert_blocks_accounted(s)
    assert s.num_preemptions >= 1
    assert (s.seqs["b"].block_table, s.seqs["b"].num_computed_tokens, s.seqs["b"].num_blocks_on_stages) == ([], 0, 0)
    s.finish("a")
    step = s.schedule()
    (x,) = step.sequences
    assert (x.request_id, x.num_computed_tokens, x.input_ids, x.is_partial_prefill) == ("b", 0, [1, 2, 3, 4], True)
    assert x.block_table  # the stages get its table whole again
    assert_blocks_accounted(s)


def test_a_chunk_in_flight_that_ends_or_is_lost_leaves_nothing_behind():
    s = scheduler(max_num_batched_tokens=4)
    s.add(seq("a", prompt_len=10))
    step = s.schedule()
    assert s.finish("a") == [] and s.in_flight == {}  # aborted mid-prefill: its step waits for nothing
    assert s.blocks.num_free == 64
    s.add(seq("b", prompt_len=10))
    step = s.schedule()
    assert s.fail(step.step_id) == ["b"] and s.seqs["b"].step_id == 0  # the caller ends b
    s.finish("b")
    assert s.blocks.num_free == 64 and s.seqs == {}


def test_chunks_publish_their_full_blocks_to_the_prefix_cache_as_they_complete():
    s = scheduler(max_num_batched_tokens=4)
    s.add(prompt_seq("a", list(range(1, 11))))
    step = s.schedule()
    s.computed(step.step_id)  # [1-4] is on every stage now
    s.add(prompt_seq("b", [1, 2, 3, 4, 30, 31]))
    step = s.schedule()
    b = [x for x in step.sequences if x.request_id == "b"]
    assert b == [] or b[0].num_computed_tokens == 4  # b (if it fits) starts after the cached block
    s.computed(step.step_id)
    while "b" not in {x.request_id for x in step.sequences}:
        step = s.schedule()
        s.computed(step.step_id)
        s.update(step.step_id, rows(**{x.request_id: 0 for x in step.sequences if not x.is_partial_prefill}))
    (b,) = [x for x in step.sequences if x.request_id == "b"]
    assert b.num_computed_tokens == 4 and b.input_ids == [30, 31]
    assert_blocks_accounted(s)
