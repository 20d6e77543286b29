"""How a step spends its token budget (`max_num_batched_tokens`), as pure functions: decodes
first, one token each, then prefills with what is left, in chunks when chunked prefill is on."""

from __future__ import annotations


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
