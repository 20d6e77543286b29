"""FastSampler against the reference sampler: the same tokens and logprobs, bit for bit.

Every test samples identical copies of the same sequences with `sample()` and with a
FastSampler and compares the results exactly (token ids, and logprobs as protos of float
values). Samplers built with small blocks and rounds drive every candidate path on small
vocabularies; `draw.top_p_rows` shows which paths a test exercised.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tandem.core.config import load_config
from tandem.core.errors import ConfigError, InvalidArgumentError
from tandem.core.sampling import fast as fast_sampling
from tandem.core.sampling.fast import FastSampler
from tandem.core.sampling.options import SamplingOptions
from tandem.core.sampling.penalty_history import PenaltyHistory
from tandem.core.sampling.reference import SequenceState, sample, truncated_probs
from tandem.cpu_sampler.config import SamplerConfig
from tandem.cpu_sampler.engine import SamplerEngine
from tandem.v1 import common_pb2

LIMIT = 1000
INF = math.inf


def make_state(vocab: int, request_id: str, seed: int, prompt=(), outputs=(), blocked=(), client_seed=None,
               **params) -> SequenceState:
    """A sequence whose generator seed is `seed`; `client_seed` is SamplingParams.seed."""
    if client_seed is not None:
        params["seed"] = client_seed
    options = SamplingOptions.from_proto(common_pb2.SamplingParams(max_tokens=LIMIT, **params), vocab, LIMIT)
    return SequenceState(request_id, options, seed, prompt, outputs, blocked)


def twins(vocab: int, rows: list[dict]) -> tuple[list[SequenceState], list[SequenceState]]:
    """Two identical lists of states, one per sampler; each row: make_state keyword arguments."""
    return ([make_state(vocab, f"r{i}", **row) for i, row in enumerate(rows)],
            [make_state(vocab, f"r{i}", **row) for i, row in enumerate(rows)])


def compare(fast: FastSampler, logits: torch.Tensor, reference_states, fast_states, steps: int = 1,
            scale: float = 1.0) -> None:
    """Sample `steps` frames (logits, then fresh random ones) with both samplers; the results
    and the recorded histories must match at every step."""
    generator = torch.Generator().manual_seed(1234)
    for step in range(steps):
        if step:
            logits = torch.randn(logits.shape, generator=generator) * scale
        indices = [s.num_outputs for s in reference_states]
        expected = sample(logits, reference_states, indices)
        got = fast.sample(logits, fast_states, indices)
        assert got == expected, f"step {step}: {[t for t, _ in got]} != {[t for t, _ in expected]}"
        assert [s.output_ids for s in fast_states] == [s.output_ids for s in reference_states]


def random_row(rng: random.Random, vocab: int) -> dict:
    """make_state arguments mixing every option, each present or absent at random."""
    row: dict = dict(seed=rng.getrandbits(40), prompt=[rng.randrange(vocab) for _ in range(rng.randrange(40))],
                     outputs=[rng.randrange(vocab) for _ in range(rng.randrange(12))],
                     blocked=[rng.randrange(vocab) for _ in range(rng.randrange(4))])
    row["temperature"] = rng.choice([0.0, 0.0, 0.25, 0.8, 1.0, 1.6])
    if rng.random() < 0.7:
        row["top_p"] = rng.choice([1e-6, 0.05, 0.5, 0.9, 0.95, 0.99, 0.9999999, 1.0])
    if rng.random() < 0.3:
        row["top_k"] = rng.choice([1, 2, 7, 40, vocab])
    if rng.random() < 0.25:
        row["min_p"] = rng.choice([0.001, 0.05, 0.3])
    if rng.random() < 0.5:
        row["repetition_penalty"] = rng.choice([0.6, 1.2, 2.0])
    if rng.random() < 0.5:
        row["frequency_penalty"] = rng.choice([-1.0, 0.3, 2.0])
    if rng.random() < 0.5:
        row["presence_penalty"] = rng.choice([-0.5, 0.7])
    if rng.random() < 0.4:
        row["logprobs"] = rng.choice([0, 1, 5, 20])
    if rng.random() < 0.3:
        row["logit_bias"] = {rng.randrange(vocab): rng.uniform(-30, 30) for _ in range(3)}
    if rng.random() < 0.3:
        row["min_tokens"] = rng.randrange(1, 6)
    if rng.random() < 0.3:
        row["client_seed"] = row["seed"]  # the key leaves the request id out
    return row


def random_logits(rng: random.Random, rows: int, vocab: int) -> torch.Tensor:
    """Gaussian rows, some peaked, some flat, some with -inf runs or integer ties."""
    generator = torch.Generator().manual_seed(rng.getrandbits(32))
    logits = torch.randn(rows, vocab, generator=generator) * rng.choice([0.5, 2.0, 4.0])
    for row in range(rows):
        kind = rng.random()
        if kind < 0.25:
            logits[row, torch.randint(0, vocab, (5,), generator=generator)] += 8.0
        elif kind < 0.4:
            logits[row, rng.randrange(3)::rng.choice([2, 3, 5])] = -INF
        elif kind < 0.55:
            logits[row] = logits[row].round()
    return logits


SMALL_ROUNDS = dict(block=8, block_rounds=(2, 4), chunk_rows=5, reference_below=0)
SAMPLERS = {  # FastSampler arguments; reference_below=0: even small frames take the fast path
    "default": dict(reference_below=0),
    "small-blocks": SMALL_ROUNDS,
    "histogram-only": dict(block_rounds=(), chunk_rows=3, reference_below=0),
    "reference-fallback": dict(block_rounds=(), histogram_slack=(), reference_below=0),
    "two-threads": dict(SMALL_ROUNDS, num_threads=2, chunk_rows=2),
}
FAST = dict(reference_below=0)


@pytest.mark.parametrize("vocab", [5, 64, 1001, 4099])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_random_frames_match_reference(vocab, sampler):
    rng = random.Random(f"{vocab}-{sampler}")
    fast = FastSampler(**SAMPLERS[sampler])
    for _ in range(3):
        rows = [random_row(rng, vocab) for _ in range(rng.randrange(1, 12))]
        reference_states, fast_states = twins(vocab, rows)
        compare(fast, random_logits(rng, len(rows), vocab), reference_states, fast_states, steps=4,
                scale=rng.choice([1.0, 3.0]))
    fast.close()
    if vocab >= 1001 and sampler in ("small-blocks", "histogram-only", "default"):
        assert fast.draw.top_p_rows["block" if sampler != "histogram-only" else "histogram"] > 0
    if sampler == "reference-fallback":
        assert set(fast.draw.top_p_rows) <= {"reference"}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_distributions_equal_the_reference_bit_for_bit(sampler):
    """Stronger than equal tokens: every probability the draw reads is the reference's own
    (a draw would only notice a last-bit difference when u lands right on a boundary)."""
    rng = random.Random(sampler)
    vocab = 2001
    fast = FastSampler(**SAMPLERS[sampler])
    for _ in range(4):
        rows = [random_row(rng, vocab) for _ in range(10)]
        opts = [make_state(vocab, "r", **row).options for row in rows]
        scaled = random_logits(rng, len(rows), vocab) * rng.choice([1.0, 3.0])  # as if temperature-scaled
        reference = [truncated_probs(scaled[i].clone(), o) for i, o in enumerate(opts)]
        whole, compact = fast.draw.distributions(scaled.clone(), opts)
        for i, probs in whole.items():
            assert torch.equal(probs, reference[i]), f"row {i}"
        order, ids, values = compact or ([], None, None)
        for j, i in enumerate(order):
            real = ids[j] < vocab
            kept = ids[j][real]
            assert torch.equal(values[j][real], reference[i][kept]), f"row {i}"
            rest = reference[i].clone()
            rest[kept] = 0.0
            assert not rest.any(), f"row {i}: a token outside the kept set has probability"
        assert sorted([*whole, *order]) == list(range(len(rows)))
    fast.close()


def test_every_candidate_path_is_exercised_and_exact():
    """Peaked rows are proven by blocks, flat ones by the histogram, top_p ~ 1 by the reference."""
    vocab = 3000
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(9, vocab, generator=generator) * 0.5  # flat: top-p sets of thousands
    logits[:3, :7] += 12.0  # peaked rows
    rows = ([dict(seed=i, temperature=0.9, top_p=0.9) for i in range(3)]
            + [dict(seed=i, temperature=0.9, top_p=0.8, repetition_penalty=1.3) for i in range(3)]
            + [dict(seed=i, temperature=0.9, top_p=0.9999999) for i in range(3)])
    fast = FastSampler(**FAST)
    compare(fast, logits, *twins(vocab, rows))
    assert fast.draw.top_p_rows == {"block": 3, "histogram": 3, "reference": 3}


@pytest.mark.parametrize("top_p", [1e-7, 0.3, 0.5, 0.75, 0.999])
def test_ties_across_the_top_p_boundary_keep_the_lowest_ids(top_p):
    """Equal logits make equal probabilities; the reference's stable sort keeps lower ids."""
    vocab = 1000
    logits = torch.zeros(4, vocab)
    logits[1, ::3] = 2.0  # ties within two levels
    logits[2, 500:] = -INF
    logits[3] = torch.arange(vocab) % 4  # four tied levels
    rows = [dict(seed=s, temperature=1.0, top_p=top_p, logprobs=20) for s in range(4)]
    for sampler in SAMPLERS.values():
        fast = FastSampler(**sampler)
        compare(fast, logits, *twins(vocab, rows), steps=1)
        fast.close()


def test_greedy_ties_and_logprob_ties_match():
    vocab = 777
    logits = torch.full((3, vocab), -INF)
    logits[0, [700, 5, 300]] = 1.0  # greedy tie: lowest id; fewer finite tokens than logprobs
    logits[1] = (torch.arange(vocab) % 3).float()  # 259 tokens tie at the top
    logits[2, :] = 0.0
    rows = [dict(seed=1, temperature=0.0, logprobs=20), dict(seed=2, temperature=0.0, logprobs=7),
            dict(seed=3, temperature=0.5, logprobs=20, top_k=3)]
    compare(FastSampler(**FAST), logits, *twins(vocab, rows))


def test_tiny_and_full_top_p_with_top_k_and_min_p():
    vocab = 2048
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2)) * 3
    rows = [dict(seed=1, top_p=1e-6), dict(seed=2, top_p=1.0), dict(seed=3, top_p=0.9, top_k=50),
            dict(seed=4, top_p=0.9, min_p=0.1), dict(seed=5, top_k=1), dict(seed=6, top_p=0.6, top_k=5, min_p=0.5)]
    compare(FastSampler(**FAST), logits, *twins(vocab, rows), steps=5, scale=3.0)


def test_penalties_bias_and_min_tokens_over_many_steps():
    """Histories grow step by step; counts, seen ids and the min_tokens mask follow them."""
    vocab = 97  # small, so outputs repeat and counts grow
    rng = random.Random(3)
    rows = [dict(seed=i, temperature=1.2, prompt=[rng.randrange(vocab) for _ in range(30)],
                 repetition_penalty=rng.choice([0.5, 1.5]), frequency_penalty=rng.choice([-2.0, 1.0]),
                 presence_penalty=rng.choice([-2.0, 2.0]), min_tokens=10, blocked=[0, 1, 2],
                 logit_bias={0: 40.0, 50: -3.5}, logprobs=3)
            for i in range(6)]
    compare(FastSampler(**FAST), torch.randn(6, vocab), *twins(vocab, rows), steps=25)


def test_overflowing_logits_are_clamped_the_same_way():
    vocab = 300
    logits = torch.randn(3, vocab)
    logits[:, 10] = 3e38
    logits[:, 11] = 2e38
    rows = [dict(seed=1, temperature=0.3, top_p=0.9), dict(seed=2, temperature=0.5, logprobs=2),
            dict(seed=3, temperature=0.0, repetition_penalty=0.5, prompt=[10, 11])]
    compare(FastSampler(**FAST), logits, *twins(vocab, rows))


def test_replay_and_repeated_sequences_follow_the_reference():
    vocab = 500
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(8)) * 2
    reference_states, fast_states = twins(vocab, [dict(seed=s, top_p=0.8, frequency_penalty=0.5, logprobs=2)
                                                  for s in range(3)])
    fast = FastSampler(**FAST)
    compare(fast, logits, reference_states, fast_states, steps=3)
    # A replay of index 1 for r0 next to a new output for r1.
    frame = logits[[0, 1]]
    assert fast.sample(frame, [fast_states[0], fast_states[1]], [1, 3]) == \
        sample(frame, [reference_states[0], reference_states[1]], [1, 3])
    # One sequence twice in a frame: a new output, then a replay of it (row order matters).
    twice = logits[[2, 2]]
    assert fast.sample(twice, [fast_states[2]] * 2, [3, 3]) == sample(twice, [reference_states[2]] * 2, [3, 3])
    # The history caught up with the output the reference path recorded.
    compare(fast, logits, reference_states, fast_states, steps=3)


def test_bad_rows_raise_as_the_reference_does_and_change_nothing():
    vocab = 50
    reference_states, fast_states = twins(vocab, [dict(seed=1), dict(seed=2, logit_bias={40: 1.0})])
    cases = [
        (torch.randn(2, vocab), [0, 5]),  # skips ahead
        (torch.full((2, vocab), -INF), [0, 0]),  # every token masked
        (torch.randn(2, 20), [0, 0]),  # bias id outside the vocabulary
        (torch.randn(2, vocab).index_fill_(1, torch.tensor([3]), math.nan), [0, 0]),
        (torch.randn(3, vocab), [0, 0]),  # more rows than states
        (torch.randn(2, vocab, dtype=torch.float64), [0, 0]),
    ]
    fast = FastSampler(**FAST)
    for logits, indices in cases:
        with pytest.raises(InvalidArgumentError) as expected:
            sample(logits, reference_states, indices)
        with pytest.raises(InvalidArgumentError) as got:
            fast.sample(logits, fast_states, indices)
        assert str(got.value) == str(expected.value)
    assert all(s.num_outputs == 0 for s in fast_states)


def test_penalty_history_counts_equal_the_state_counts():
    state = make_state(100, "r", 1, prompt=[5, 5, 7], outputs=[7, 8, 8, 9], repetition_penalty=1.5)
    history = PenaltyHistory(state)
    for token in [8, 10, 5, 10, 10] * 10:
        state.append(token)
    history.sync(state.output_ids)
    counts = dict(zip(history.output_ids.view().tolist(), history.output_counts.view().tolist()))
    assert counts == dict(state.output_counts)
    assert sorted(history.seen_ids.view().tolist()) == sorted(set(state.prompt_ids.tolist()) | set(state.output_ids))


def test_bad_thread_and_chunk_counts_are_rejected():
    with pytest.raises(InvalidArgumentError, match="num_threads=0"):
        FastSampler(num_threads=0)
    with pytest.raises(InvalidArgumentError, match="chunk_rows=0"):
        FastSampler(chunk_rows=0)


def test_small_frames_go_to_the_reference_and_large_ones_do_not():
    rows = [dict(seed=s, top_p=0.5) for s in range(4)]
    for vocab, fast_path in ((4000, False), (4096, True)):  # 4 rows: 16,000 and 16,384 logits
        fast = FastSampler()
        compare(fast, torch.randn(4, vocab) * 3, *twins(vocab, rows), steps=2)
        assert (sum(fast.draw.top_p_rows.values()) > 0) == fast_path


def test_engine_gives_the_same_frames_with_either_sampler():
    vocab = 2048  # 9 rows: large enough a frame for the fast path
    rng = random.Random(11)
    rows = [random_row(rng, vocab) for _ in range(8)]
    engines = [SamplerEngine(vocab, fast_sampler=False), SamplerEngine(vocab, fast_sampler=True, num_threads=2)]
    assert [e.fast_sampler for e in engines] == [False, True]
    for engine in engines:
        engine.add([make_state(vocab, f"r{i}", **row) for i, row in enumerate(rows)])
    ids = [f"r{i}" for i in range(8)] + ["gone"]
    for step in range(4):
        logits = random_logits(rng, 9, vocab)
        logits[3, 7] = math.nan  # skipped, and named in the error
        indices = [step] * 9
        a, b = (engine.sample_frame(ids, indices, logits) for engine in engines)
        assert (a.rows, a.error) == (b.rows, b.error)
        assert "row 3" in a.error and "'gone'" in a.error
    for engine in engines:
        engine.close()


def test_config_switch_defaults_and_validation():
    config = SamplerConfig()
    assert config.fast_sampler is True and config.num_threads == 1
    assert SamplerEngine.from_config(load_config(SamplerConfig, {"fast_sampler": False, "vocab_size": 8})).fast_sampler is False
    with pytest.raises(ConfigError, match="num_threads"):
        load_config(SamplerConfig, {"num_threads": 0, "vocab_size": 8})


@pytest.mark.parametrize("columns", [7, 512, 513, 2 * 256 + 1, 32000, 32001])
def test_first_argmax_is_torch_argmax_ties_and_short_chunks_included(columns):
    from tandem.core.sampling.argmax import first_argmax

    generator = torch.Generator().manual_seed(columns)
    x = torch.randn(9, columns, generator=generator)
    x[1] = 0.0  # every column ties: the first wins
    x[2, -1] = 50.0  # the maximum in the last (maybe short) chunk
    x[3, 3] = x[3, -2] = 40.0  # a tie across chunks
    x[4, :] = -INF
    x[4, columns // 2] = -1.0
    x[5, 0] = 60.0
    x[6, columns // 2] = x[6, columns // 2 + 1] = 70.0  # a tie inside one chunk
    assert torch.equal(first_argmax(x), x.argmax(dim=1))


def test_a_frame_of_argmax_only_rows_takes_the_short_path_with_the_reference_s_tokens(monkeypatch):
    vocab = 4096
    rows = [dict(seed=i, temperature=0.0) for i in range(6)]
    rows += [dict(seed=9, temperature=0.0, min_tokens=3), dict(seed=10, temperature=0.0)]  # blocks EOS for 3 tokens
    reference_states, fast_states = twins(vocab, rows)
    for state in reference_states + fast_states:
        state.blocked_ids = torch.tensor([2])
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(5))
    logits[6, 2] = 100.0  # the blocked id would win without min_tokens
    compare(FastSampler(), logits, reference_states, fast_states, steps=5)
    assert fast_states[6].output_ids[0] != 2
    greedy_only, greedy_twins = twins(vocab, rows[:6])
    short_paths = []
    monkeypatch.setattr(fast_sampling, "first_argmax", lambda x: short_paths.append(x.data_ptr()) or x.argmax(dim=1))
    compare(FastSampler(reference_below=0), logits[:6], greedy_only, greedy_twins, steps=3)  # all argmax-only
    assert short_paths[0] == logits[:6].data_ptr()  # the frame itself, not a copy
