"""TD-Pipe's scheduling decisions, as pure functions (../shared/TECHNIQUES.md, "TD-Pipe").

The whole pipeline runs either prefill micro-batches only or decode micro-batches only, and
switches rarely. Three decisions drive it, each a function of numbers the scheduler holds:

- `admits`: while requests wait, admit one more prefill if the KV blocks projected for the
  coming steps (every running request growing by one token a step until its predicted output
  length) stay under a share of the pool at every checkpoint ahead.
- `micro_batch_sizes`: in decode, the ready sequences spread over the micro-batches in flight
  so that they stay equal (work stealing: each step is rebuilt from the ready pool).
- `switch_to_prefill`: while decoding with requests waiting, go back to prefill once a decode
  micro-batch uses the stages less well than a prefill round would after its bubbles, by the
  stages' measured forward time against tokens (the stage profile's T(n)).

Not yet wired into the scheduler (issue 12); these are the decisions it will call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Steps ahead at which the KV peak is projected, as TD-Pipe's code does: 5, 8, then powers of two.
CHECKPOINTS = (5, 8, *(1 << k for k in range(4, 13)))
MEMORY_SHARE = 0.9  # admit while the projected peak stays under this share of the blocks


@dataclass(frozen=True)
class Running:
    """A request holding KV: tokens it has now, and output tokens it is predicted still to make."""

    num_tokens: int
    predicted_remaining: int


def projected_peak(running: Sequence[Running], block_size: int, checkpoints: Sequence[int] = CHECKPOINTS) -> int:
    """Most KV blocks the requests will hold at once, now or at any checkpoint ahead: at +m steps
    each request still generating (predicted remaining >= m) holds ceil((tokens + m) / block_size)."""
    def blocks_at(m: int) -> int:
        return sum(-(-(r.num_tokens + m) // block_size) for r in running if m == 0 or r.predicted_remaining >= m)

    return max(blocks_at(m) for m in (0, *checkpoints))


def admits(running: Sequence[Running], candidate: Running, num_blocks: int, block_size: int,
           share: float = MEMORY_SHARE) -> bool:
    """Whether one more prefill (`candidate`: its prompt and predicted output) keeps the projected
    peak under `share` of `num_blocks`."""
    return projected_peak([*running, candidate], block_size) < share * num_blocks


def micro_batch_sizes(num_ready: int, num_in_flight: int) -> list[int]:
    """Sizes of the next `num_in_flight` decode micro-batches over `num_ready` sequences: equal, the
    first (num_ready mod num_in_flight) one larger."""
    base, extra = divmod(num_ready, num_in_flight)
    return [base + (1 if i < extra else 0) for i in range(num_in_flight)]


@dataclass(frozen=True)
class SwitchDecision:
    switch: bool
    intensity: float  # the decode micro-batch's tokens per second against the saturated rate
    threshold: float  # the prefill round's useful share of its time, after its bubbles
    prefill_s: float
    bubble_s: float


def switch_to_prefill(decode_tokens: int, waiting_prompt_lens: Sequence[int], num_stages: int,
                      forward_s: Callable[[int], float], saturating_tokens: int) -> SwitchDecision:
    """TD-Pipe's spatial-temporal intensity rule.

    `forward_s(n)` is the whole model's forward time for a batch of n tokens (the stages' times
    summed); a stage takes 1/num_stages of it. Intensity I(b) = (b / T(b)) / (B* / T(B*)), with
    B* = `saturating_tokens`. A prefill round of the waiting prompts takes sum T(len)/P plus
    max T(len)/P for each of the other P-1 stages to drain; while its longest prompt fills the
    pipeline, the stages that wait lose (max T(len)/P - T(decode)/P) each. Switch when
    I(decode) < (prefill - bubble) / prefill. (TECHNIQUES.md writes the bubble with T(decode)
    unscaled; a stage's share, T(decode)/P, is used here so both terms are per stage.)
    """
    if not waiting_prompt_lens:
        return SwitchDecision(False, 1.0, 0.0, 0.0, 0.0)
    p = num_stages
    intensity = (decode_tokens / forward_s(decode_tokens)) / (saturating_tokens / forward_s(saturating_tokens))
    per_stage = [forward_s(n) / p for n in waiting_prompt_lens]
    longest = max(per_stage)
    prefill = sum(per_stage) + longest * (p - 1)
    bubble = max(0.0, longest - forward_s(decode_tokens) / p) * (p - 1)
    threshold = (prefill - bubble) / prefill
    return SwitchDecision(intensity < threshold, intensity, threshold, prefill, bubble)
