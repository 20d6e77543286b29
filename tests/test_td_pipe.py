"""TD-Pipe's scheduling decisions as pure functions, against hand computations."""

from __future__ import annotations

import random

from tandem.coordinator.kv_projection import Projection, Running, admits, projected_peak
from tandem.coordinator.output_lengths import BucketMeans
from tandem.coordinator.scheduler import Sampled, Scheduler, Sequence
from tandem.coordinator.td_pipe import Phase, TemporalPhases, micro_batch_sizes, saturating_tokens, switch_to_prefill


def test_projected_peak_by_hand():
    # Block size 4. A: 10 tokens, 3 more to come; B: 4 tokens, 100 more.
    running = [Running(10, 3), Running(4, 100)]
    # now: 3 + 1 blocks; +5: A done, B at 9 tokens = 3; +8: B at 12 = 3; +16: B at 20 = 5.
    assert projected_peak(running, 4, checkpoints=(5, 8)) == 4
    assert projected_peak(running, 4, checkpoints=(5, 8, 16)) == 5
    assert projected_peak([], 4) == 0


def test_admission_keeps_the_projected_peak_under_the_share():
    running = [Running(16, 64)]  # 4 blocks now, (16 + 64) / 4 = 20 at +64
    assert projected_peak(running, 4, checkpoints=(64,)) == 20
    # Default checkpoints 5, 8, 16, 32, 64, ...: a 4-token prompt expected to make 28 tokens holds
    # 5 blocks at +16 (8 + 5 = 13 in all) and is done by +32; the peak stays A's 20 at +64.
    candidate = Running(4, 28)
    assert projected_peak([*running, candidate], 4) == 20
    assert admits(running, candidate, num_blocks=23, block_size=4)  # 20 < 0.9 * 23 = 20.7
    assert not admits(running, candidate, num_blocks=22, block_size=4)  # 20 >= 19.8


def test_micro_batches_stay_equal():
    assert micro_batch_sizes(10, 3) == [4, 3, 3]
    assert micro_batch_sizes(2, 3) == [1, 1, 0]
    for _ in range(100):
        total, parts = random.randrange(0, 500), random.randrange(1, 9)
        sizes = micro_batch_sizes(total, parts)
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def linear(n: int) -> float:
    """A synthetic profile: 10 ms fixed, 0.1 ms a token (whole model)."""
    return 0.01 + 0.0001 * n


def test_switch_to_prefill_on_a_synthetic_profile():
    # Decode micro-batch of 8 tokens: intensity (8 / 10.8 ms) / (2048 / 214.8 ms) = 0.0777.
    # Two waiting 512-token prompts over 2 stages: each 30.6 ms a stage; prefill 61.2 + 30.6 = 91.8 ms;
    # bubble (30.6 - 5.4) = 25.2 ms; threshold (91.8 - 25.2) / 91.8 = 0.7255.
    d = switch_to_prefill(8, [512, 512], 2, linear, 2048)
    assert abs(d.intensity - 0.0777) < 1e-3 and abs(d.threshold - 0.7255) < 1e-3 and d.switch
    assert abs(d.prefill_s - 0.0918) < 1e-9 and abs(d.bubble_s - 0.0252) < 1e-9
    # A saturated decode batch uses the stages as well as anything: stay.
    assert not switch_to_prefill(2048, [512, 512], 2, linear, 2048).switch
    # Nothing waiting: stay.
    assert not switch_to_prefill(8, [], 2, linear, 2048).switch


def test_bucket_means_converge_and_a_hint_wins():
    p = BucketMeans(prior=100, min_samples=8)
    assert p.predict(30, max_tokens=1000) == 100  # nothing learnt: the prior
    assert p.predict(30, max_tokens=50) == 50  # never more than the request may make
    rng = random.Random(0)
    for _ in range(2000):  # short prompts answer ~200 tokens, long ones ~40
        p.observe(rng.randrange(8, 16), max(1, round(rng.gauss(200, 30))))
        p.observe(rng.randrange(512, 1024), max(1, round(rng.gauss(40, 10))))
    assert abs(p.predict(12, 4096) - 200) <= 5
    assert abs(p.predict(700, 4096) - 40) <= 3
    assert abs(p.predict(70, 4096) - 120) <= 5  # an unseen bucket: the mean over all
    assert p.predict(12, 4096, hint=77) == 77


def test_the_incremental_projection_equals_the_reference():
    rng = random.Random(7)
    for _ in range(50):
        running = [Running(rng.randrange(1, 300), rng.randrange(0, 500)) for _ in range(rng.randrange(0, 20))]
        projection = Projection(running[:-1] if running else [], 16, limit=10**9)
        if running:
            projection.add(running[-1])
        assert projection.peak == projected_peak(running, 16)
        candidate = Running(rng.randrange(1, 300), rng.randrange(0, 500))
        peak_with = projected_peak([*running, candidate], 16)
        assert Projection(running, 16, limit=peak_with + 1).fits(candidate)
        assert not Projection(running, 16, limit=peak_with).fits(candidate)


def test_saturating_tokens_of_a_linear_profile():
    # n / (10 ms + 0.1 ms n) tends to 10,000 tokens/s; 90% of the best power of two up to 2048
    # (2048 / 214.8 ms = 9,534/s) is 8,581/s, first reached at 1024 (1024 / 112.4 ms = 9,110/s;
    # 512 gives 512 / 61.2 ms = 8,366/s).
    assert saturating_tokens(linear, 2048) == 1024
    assert saturating_tokens(linear, 1) == 1


def phased(num_blocks: int = 64, hint: int = 8, **options) -> tuple[Scheduler, TemporalPhases]:
    phases = TemporalPhases(num_blocks, 4, num_stages=2, forward_s=linear, saturating_tokens=1024,
                            predictor=BucketMeans(prior=hint))
    args = dict(num_blocks=num_blocks, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_in_flight=3)
    return Scheduler(**{**args, **options}, phases=phases), phases


def prompt(rid: str, length: int = 6, hint: int = 0) -> Sequence:
    return Sequence(rid, list(range(1, length + 1)), max_tokens=100, sampler="s0", output_len_hint=hint)


def answer(s: Scheduler, step) -> None:
    s.update(step.step_id, {x.request_id: Sampled(7) for x in step.sequences})


def kinds(step) -> set[str]:
    return {"prefill" if len(x.input_ids) > 1 else "decode" for x in step.sequences}


def test_temporal_phases_never_mix_prefill_and_decode_in_a_micro_batch():
    s, phases = phased()
    for i in range(3):
        s.add(prompt(f"a{i}"))
    first = s.schedule()
    assert kinds(first) == {"prefill"} and phases.phase is Phase.PREFILL
    answer(s, first)
    # Nothing waits: the pipeline turns to decode and stays there while nothing new comes.
    second = s.schedule()
    assert kinds(second) == {"decode"} and phases.phase is Phase.DECODE
    # A prompt arrives. The next decode micro-batch (3 rows, intensity far under the prefill
    # round's) is the last before the switch: then the prompt runs alone, decodes wait.
    s.add(prompt("b", length=40))
    answer(s, second)
    third = s.schedule()
    assert kinds(third) == {"decode"} and phases.phase is Phase.PREFILL
    fourth = s.schedule()
    assert kinds(fourth) == {"prefill"} and [x.request_id for x in fourth.sequences] == ["b"]
    assert phases.num_switches == {Phase.PREFILL: 1, Phase.DECODE: 1}
    answer(s, third)
    answer(s, fourth)
    # Nothing waits again: back to decode, the four sequences spread over the micro-batches.
    fifth, sixth = s.schedule(), s.schedule()
    assert kinds(fifth) == kinds(sixth) == {"decode"} and len(fifth.sequences) == len(sixth.sequences) == 2
    assert phases.phase is Phase.DECODE and phases.switch_counts() == (1, 2)


def test_admission_stops_at_the_projected_peak_and_decoding_takes_over():
    # 20 blocks of 4 tokens, limit 0.9 * 20 = 18. Each 6-token prompt with a hint of 10 output
    # tokens holds 2 blocks now and 4 at +8 (6 + 8 = 14 tokens; at +16 it is done): the projected
    # peak is 4 blocks a prompt, so four fit (16 < 18) and the fifth does not (20).
    s, phases = phased(num_blocks=20)
    for i in range(6):
        s.add(prompt(f"p{i}", hint=10))
    first = s.schedule()
    assert [x.request_id for x in first.sequences] == ["p0", "p1", "p2", "p3"]
    assert s.schedule() is None and phases.phase is Phase.DECODE  # p4 does not fit; nothing is ready yet
    answer(s, first)
    assert kinds(s.schedule()) == {"decode"}


def test_with_nothing_running_a_prompt_over_the_projection_still_runs():
    s, _ = phased(num_blocks=8)
    s.add(prompt("big", length=20, hint=50))  # projected 18 blocks, over 0.9 * 8
    step = s.schedule()
    assert [x.request_id for x in step.sequences] == ["big"]


def test_completed_requests_teach_the_predictor():
    s, phases = phased(hint=100)
    for i in range(8):
        s.add(prompt(f"r{i}"))
        s.seqs[f"r{i}"].output_ids = [1] * 12
        s.finish(f"r{i}")
    assert phases.predict(6, max_tokens=1000) == 12


def test_a_prompt_part_way_through_its_chunks_keeps_the_prefill_phase():
    s, phases = phased(max_num_batched_tokens=4)  # chunked prefill: 4 tokens a step
    s.add(prompt("long", length=10))
    first = s.schedule()
    assert [len(x.input_ids) for x in first.sequences] == [4]
    s.computed(first.step_id)  # a chunk that samples nothing completes once the last stage ran it
    second = s.schedule()
    assert [len(x.input_ids) for x in second.sequences] == [4] and phases.phase is Phase.PREFILL
    s.computed(second.step_id)
    third = s.schedule()
    assert [len(x.input_ids) for x in third.sequences] == [2]  # the last chunk, which samples
    answer(s, third)
    assert kinds(s.schedule()) == {"decode"} and phases.phase is Phase.DECODE


def test_a_prompt_fits_only_if_its_blocks_are_free_now():
    # Block size 4, limit 100 (far off): B's 10 tokens take 3 blocks now, of 5 free.
    projection = Projection([Running(16, 4)], 4, 100.0, free_blocks=5)
    assert projection.fits(Running(10, 1))
    projection.add(Running(10, 1))  # 2 free blocks left
    assert not projection.fits(Running(10, 1)) and projection.fits(Running(8, 1))
    assert projection.num_running == 2 and projection.free_blocks == 2


def test_with_a_kv_store_admission_fills_the_free_blocks_and_turns_to_decode():
    # The test above with 20 blocks admitted four prompts (projected peak 4 blocks each, under
    # 0.9 * 20). With room for 100 blocks in the KV store the projection's limit is 0.9 * 120 and
    # the free blocks decide: each 6-token prompt takes 2 blocks now.
    phases = TemporalPhases(20, 4, num_stages=2, forward_s=linear, saturating_tokens=1024,
                            predictor=BucketMeans(prior=10), num_host_blocks=100)
    s = Scheduler(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_in_flight=3,
                  num_host_blocks=100, phases=phases)
    for i in range(12):
        s.add(prompt(f"p{i}", hint=10))
    first = s.schedule()  # eight prompts, a step's most rows: 16 of the 20 blocks
    assert [x.request_id for x in first.sequences] == [f"p{i}" for i in range(8)]
    second = s.schedule()  # the last 4 blocks
    assert [x.request_id for x in second.sequences] == ["p8", "p9"]
    # p10 fits the projection but not the free blocks: the phase turns to decode rather than wait
    # in prefill for blocks that only decoding (a request's end, or a swap-out) can free.
    assert s.schedule() is None and phases.phase is Phase.DECODE
    answer(s, first)
    assert kinds(s.schedule()) == {"decode"}
