"""TD-Pipe's scheduling decisions as pure functions, against hand computations."""

from __future__ import annotations

import random

from tandem.coordinator.output_lengths import BucketMeans
from tandem.coordinator.td_pipe import Running, admits, micro_batch_sizes, projected_peak, switch_to_prefill


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
