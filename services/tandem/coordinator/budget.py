"""How a step spends its token budget (`max_num_batched_tokens`), as pure functions: decodes
first, one token each, then prefills with what is left, in chunks when chunked prefill is on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tandem.coordinator.steps import Sequence as Seq
from tandem.coordinator.steps import Status


def num_decodes(num_ready: int, num_rows_in_flight: int, max_in_flight: int, max_num_seqs: int, budget: int) -> int:
    """Ready decodes a step takes: its share of every sampled sequence (`num_ready` waiting for a
    step and `num_rows_in_flight` in steps sent), spread over `max_in_flight` micro-batches, within
    its rows and its budget."""
    share = -(-(num_ready + num_rows_in_flight) // max_in_flight)
    return min(share, num_ready, max_num_seqs, budget)


def prefill_chunk(num_remaining: int, budget: int, chunked: bool, step_is_empty: bool) -> int:
    """Tokens of a prefill with `num_remaining` left to compute that a step with `budget` tokens
    left takes: with chunked prefill as many as fit; without, all or none, and a prefill longer
    than the budget runs alone, in an otherwise empty step."""
    if chunked:
        return min(num_remaining, budget)
    return num_remaining if num_remaining <= budget or step_is_empty else 0


# A step of prefills into an idle pipeline is never cut below this many tokens: every step reads
# all of a stage's weights once, which at a few hundred tokens is a small part of its time and at
# a few dozen most of it.
MIN_FILL_STEP_TOKENS = 256


def fill_step_budget(budget: int, num_pending: int, max_in_flight: int) -> int:
    """Prompt tokens a step may take while more prompts wait than sequences decode (a burst into
    an idle pipeline) and `num_pending` prompt tokens wait: about a (2 x max_in_flight)-th of them, so that
    the burst flows through the stages in several micro-batches and the last stages start early,
    instead of waiting for stage 0 to compute one micro-batch of all of them; not below
    MIN_FILL_STEP_TOKENS nor above `budget`."""
    return min(budget, max(MIN_FILL_STEP_TOKENS, -(-num_pending // (2 * max_in_flight))))


def filling(seqs: Mapping[str, Seq], waiting: Sequence[str]) -> bool:
    """More prompts wait than sequences decode: a burst into an idle, or nearly idle, pipeline
    (with none waiting, as in steady decode, answered without looking at the sequences)."""
    return bool(waiting) and len(waiting) > sum(1 for s in seqs.values() if s.output_ids)


def prompt_tokens_pending(seqs: Mapping[str, Seq], waiting: Sequence[str]) -> int:
    """Prompt tokens not yet computed of the sequences part-way through their prefill and waiting."""
    pending = [*(s for s in seqs.values() if s.status == Status.PREFILLING), *(seqs[rid] for rid in waiting)]
    return sum(s.num_tokens - s.num_computed_tokens for s in pending)
