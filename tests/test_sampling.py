"""The reference sampler: parameter validation, vLLM's penalties, truncation, determinism, replay."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from tandem.core.errors import InvalidArgumentError
from tandem.core.sampling.options import SamplingOptions
from tandem.core.sampling.reference import (
    SequenceState,
    check_row,
    penalized_logits,
    sample,
    sample_key,
)
from tandem.v1 import common_pb2

VOCAB = 50
LIMIT = 100
NAN = float("nan")


def options(**params) -> SamplingOptions:
    return SamplingOptions.from_proto(common_pb2.SamplingParams(**params), VOCAB, LIMIT)


def state(request_id: str = "r", key_seed: int = 0, prompt=(1, 2), outputs=(), blocked=(), **params) -> SequenceState:
    """A sequence whose generator seed is key_seed; params are SamplingParams fields."""
    return SequenceState(request_id, options(**params), key_seed, prompt, outputs, blocked)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, vocab]


INVALID = [
    (dict(temperature=-0.5), "temperature", "-0.5"),
    (dict(temperature=NAN), "temperature", "nan"),
    (dict(temperature=float("inf")), "temperature", "inf"),
    (dict(top_p=0.0), "top_p", "0"),
    (dict(top_p=1.5), "top_p", "1.5"),
    (dict(top_p=NAN), "top_p", "nan"),
    (dict(top_k=-2), "top_k", "-2"),
    (dict(min_p=-0.25), "min_p", "-0.25"),
    (dict(min_p=1.5), "min_p", "1.5"),
    (dict(min_p=NAN), "min_p", "nan"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty", "-1"),
    (dict(repetition_penalty=NAN), "repetition_penalty", "nan"),
    (dict(presence_penalty=2.5), "presence_penalty", "2.5"),
    (dict(presence_penalty=-2.5), "presence_penalty", "-2.5"),
    (dict(presence_penalty=NAN), "presence_penalty", "nan"),
    (dict(frequency_penalty=3.0), "frequency_penalty", "3"),
    (dict(frequency_penalty=-3.0), "frequency_penalty", "-3"),
    (dict(frequency_penalty=NAN), "frequency_penalty", "nan"),
    (dict(max_tokens=0), "max_tokens", "0"),
    (dict(max_tokens=LIMIT + 1), "max_tokens", str(LIMIT + 1)),
    (dict(min_tokens=-1), "min_tokens", "-1"),
    (dict(max_tokens=5, min_tokens=6), "min_tokens", "6"),
    (dict(logprobs=-1), "logprobs", "-1"),
    (dict(logprobs=21), "logprobs", "21"),
    (dict(logit_bias={VOCAB: 1.0}), "logit_bias", str(VOCAB)),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "-1"),
    (dict(logit_bias={3: NAN}), "logit_bias[3]", "nan"),
    (dict(stop_token_ids=[4, VOCAB]), "stop_token_ids[1]", str(VOCAB)),
    (dict(stop_token_ids=[-1]), "stop_token_ids[0]", "-1"),
    (dict(stop=["ok", ""]), "stop[1]", "''"),
    (dict(n=2), "n > 1 is not supported", "2"),
    (dict(n=0), "n", "0"),
]


@pytest.mark.parametrize("params, field, value", INVALID, ids=[f"{f}={v}" for _, f, v in INVALID])
def test_invalid_parameters_name_field_and_value(params, field, value):
    with pytest.raises(InvalidArgumentError) as info:
        options(**params)
    assert field in str(info.value) and value in str(info.value)


def test_defaults_follow_vllm():
    opts = options()
    assert (opts.temperature, opts.top_p, opts.top_k, opts.min_p) == (1.0, 1.0, None, 0.0)
    assert (opts.repetition_penalty, opts.presence_penalty, opts.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (opts.max_tokens, opts.min_tokens, opts.logprobs, opts.n, opts.seed) == (LIMIT, 0, None, 1, None)
    assert options(top_k=0).top_k is None and options(top_k=-1).top_k is None
    assert options(logit_bias={7: 2.0, 3: -1.0}).logit_bias == ((3, -1.0), (7, 2.0))


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = random_logits(8)
    states = [state(f"r{i}", temperature=0.0) for i in range(8)]
    tokens = [token for token, _ in sample(logits, states, [0] * 8)]
    assert tokens == logits.argmax(-1).tolist()
    tied = torch.zeros(1, VOCAB)
    tied[0, [9, 4, 30]] = 5.0
    assert sample(tied, [state(temperature=0.0)], [0])[0][0] == 4


def test_penalties_match_vllm_definitions():
    # vocab of 6; prompt {0, 3}; outputs 1, 1, 4; bias on 5.
    s = SequenceState("r", options(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                                   logit_bias={5: 1.5}, min_tokens=2, max_tokens=10),
                      seed=0, prompt_ids=[0, 3, 3], output_ids=[1, 1, 4], min_tokens_blocked_ids=[2])
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, 0.0])
    # repetition: 0: 2/2, 3: -3*2, 1: -1*2, 4: 1/2; then 1: -2 - (0.5*2 + 0.25), 4: 0.5 - (0.5 + 0.25)
    expected = torch.tensor([1.0, -3.25, 0.5, -6.0, -0.25, 1.5])
    assert torch.equal(penalized_logits(logits, s, 3), expected)
    # While fewer than min_tokens outputs exist, the blocked ids are masked (history of 1 output).
    early = penalized_logits(logits, s, 1)
    assert early[2] == -math.inf
    assert torch.equal(early[[0, 3, 5]], torch.tensor([1.0, -6.0, 1.5]))  # 0 and 3 from the prompt
    assert early[1] == -1.0 * 2 - (0.5 + 0.25) and early[4] == 1.0  # history is [1] only


def test_blocked_ids_are_never_sampled_before_min_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 20.0
    for seed in range(20):
        s = state(key_seed=seed, blocked=[7], min_tokens=1, max_tokens=5)
        assert sample(logits, [s], [0])[0][0] != 7


def allowed_top_p(probs: torch.Tensor, top_p: float) -> set[int]:
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for token in order:
        kept.add(token)
        mass += float(probs[token])
        if mass >= top_p:
            return kept
    return kept


@pytest.mark.parametrize("params", [dict(top_k=5), dict(top_p=0.85), dict(min_p=0.2), dict(top_k=8, min_p=0.1)])
def test_truncation_never_samples_outside_allowed_set(params):
    logits = random_logits(1, seed=3)
    temperature = 0.8
    probs = torch.softmax(logits[0] / temperature, -1)
    allowed = set(range(VOCAB))
    if "top_k" in params:
        allowed &= set(logits[0].topk(params["top_k"]).indices.tolist())
    if "top_p" in params:
        allowed &= allowed_top_p(probs, params["top_p"])
    if "min_p" in params:
        kept = torch.softmax(torch.where(torch.tensor([i in allowed for i in range(VOCAB)]), logits[0] / temperature,
                                         -math.inf), -1)
        allowed &= set((kept >= params["min_p"] * kept.max()).nonzero().flatten().tolist())
    drawn = {sample(logits, [state(key_seed=seed, temperature=temperature, **params)], [0])[0][0] for seed in range(300)}
    assert drawn <= allowed
    assert len(drawn) > 1 or len(allowed) == 1


def test_same_key_same_token_whatever_the_batch():
    logits = random_logits(4, seed=1)  # row i belongs to request r{i}

    def run(order: list[int]) -> dict[str, int]:
        states = [state(f"r{i}", key_seed=11, temperature=1.0, top_p=0.95) for i in order]
        results = sample(logits[order], states, [0] * len(order))
        return {s.request_id: token for s, (token, _) in zip(states, results)}

    full = run([0, 1, 2, 3])
    assert run([3, 1]) == {k: full[k] for k in ("r3", "r1")}
    assert run([2]) == {"r2": full["r2"]}


def test_different_seeds_draw_differently():
    flat = torch.zeros(1, VOCAB)
    tokens = {sample(flat, [state(key_seed=seed)], [0])[0][0] for seed in range(20)}
    assert len(tokens) > 5


def test_client_seed_reproduces_across_requests_server_seed_does_not():
    flat = torch.zeros(1, VOCAB)

    def tokens(request_id: str, **params) -> list[int]:
        s = state(request_id, key_seed=5, **params)
        return [sample(flat, [s], [i])[0][0] for i in range(8)]

    assert tokens("a", seed=5) == tokens("b", seed=5)
    assert tokens("a") != tokens("b")


def test_sample_key_is_stable_and_63_bit():
    key = sample_key(123, "req-1", 7)
    assert 0 <= key < 2**63 and key == sample_key(123, "req-1", 7)
    assert len({sample_key(123, "req-1", 8), sample_key(124, "req-1", 7), sample_key(123, "req-2", 7), key}) == 4
    code = "from tandem.core.sampling.reference import sample_key; print(sample_key(123, 'req-1', 7))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == key


def test_incremental_counts_equal_counts_rebuilt_from_history():
    s = state(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4)
    logits = random_logits(30, seed=2)
    for i in range(30):
        sample(logits[i : i + 1], [s], [i])
    rebuilt = state(outputs=s.output_ids, repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4)
    assert s.output_counts == Counter(s.output_ids) == rebuilt.output_counts
    assert torch.equal(penalized_logits(logits[0], s, 30), penalized_logits(logits[0], rebuilt, 30))


def test_replay_returns_the_recorded_token_and_changes_nothing():
    s = state(temperature=1.0, logprobs=3, frequency_penalty=1.0)
    logits = random_logits(5, seed=4)
    first = [sample(logits[i : i + 1], [s], [i])[0] for i in range(5)]
    counts = Counter(s.output_counts)
    assert sample(logits[2:3], [s], [2])[0] == first[2]  # same row: same token and logprobs
    assert sample(random_logits(1, seed=9), [s], [2])[0][0] == first[2][0]  # other logits: recorded token
    assert s.num_outputs == 5 and s.output_counts == counts


def test_gap_raises_and_leaves_every_state_unchanged():
    a, b = state("a"), state("b", outputs=[3, 4])
    with pytest.raises(InvalidArgumentError, match=r"'b'.*sample index 5.*2 outputs"):
        sample(random_logits(2), [a, b], [0, 5])
    assert a.num_outputs == 0 and b.output_ids == [3, 4]


def test_bad_rows_are_rejected():
    s = state(logit_bias={40: 1.0})
    nan_row = torch.zeros(VOCAB)
    nan_row[3] = NAN
    with pytest.raises(InvalidArgumentError, match="NaN"):
        check_row(nan_row, s, 0)
    with pytest.raises(InvalidArgumentError, match="logit_bias holds token id 40"):
        check_row(torch.zeros(20), s, 0)  # a vocabulary of 20 is smaller than the bias id
    with pytest.raises(InvalidArgumentError, match="masked"):
        check_row(torch.full((VOCAB,), -math.inf), s, 0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_sorted_and_match_log_softmax(temperature):
    s = state(temperature=temperature, logprobs=5, repetition_penalty=1.5)
    logits = random_logits(1, seed=5)
    token, logprobs = sample(logits, [s], [0])[0]
    expected = torch.log_softmax(penalized_logits(logits[0], state(repetition_penalty=1.5), 0)
                                 / (temperature or 1.0), -1)
    assert logprobs.sampled.token_id == token
    assert logprobs.sampled.logprob == pytest.approx(float(expected[token]), abs=1e-6)
    top = [(t.token_id, t.logprob) for t in logprobs.top]
    assert [t for t, _ in top] == expected.argsort(descending=True)[:5].tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert all(v <= 0 for _, v in top) and sum(math.exp(v) for _, v in top) <= 1.0 + 1e-6
    _, only_sampled = sample(logits, [state("x", logprobs=0)], [0])[0]
    assert len(only_sampled.top) == 0
    assert sample(logits, [state("y")], [0])[0][1] is None
