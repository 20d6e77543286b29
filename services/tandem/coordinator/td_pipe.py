"""TD-Pipe's scheduling decisions, as pure functions (../shared/TECHNIQUES.md, "TD-Pipe").

The whole pipeline runs either prefill micro-batches only or decode micro-batches only, and
switches rarely. Three decisions drive it, each a function of numbers the scheduler holds:

- `admits` (coordinator/kv_projection.py): while requests wait, admit one more prefill if the KV
  blocks projected for the coming steps (every running request growing by one token a step
  until its predicted output length) stay under a share of the pool at every checkpoint ahead.
- `micro_batch_sizes`: in decode, the ready sequences spread over the micro-batches in flight
  so that they stay equal (work stealing: each step is rebuilt from the ready pool). The
  scheduler takes this share step by step (budget.num_decodes: the first of these sizes).
- `switch_to_prefill`: while decoding with requests waiting, go back to prefill once a decode
  micro-batch uses the stages less well than a prefill round would after its bubbles, by the
  stages' measured forward time against tokens (the stage profile's T(n)).

`TemporalPhases` holds the phase and makes these decisions for the scheduler
(coordinator/scheduler.py), which asks it at every `schedule()` whether decodes or prefills may
run (`what_may_run`), and whether one more prompt fits the projected memory.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.coordinator.kv_projection import MEMORY_SHARE, Projection, Running, as_running, head_of_line
from tandem.coordinator.output_lengths import BucketMeans, OutputLengthPredictor
from tandem.coordinator.steps import Sequence as Seq
from tandem.coordinator.steps import Status
from tandem.core.modeling.profile import BALANCE_CONTEXT, StageProfile, parse_profile

log = logging.getLogger(__name__)


def waiting_prompt_lens(seqs: Mapping[str, Seq], waiting: Iterable[str], most: int = 256) -> list[int]:
    """Tokens to prefill of the prompts a prefill round would take first (at most `most`)."""
    lens = []
    for rid in waiting:
        seq = seqs[rid]
        lens.append(seq.num_tokens - seq.num_computed_tokens)
        if len(lens) >= most:
            break
    return lens


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


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


# The forward time of a batch of n tokens when no stage profile is known: a fixed cost and a
# per-token one, in seconds, in the proportions of a small model on one CPU core (the mid model's
# 6 layers: about 10 ms a step at 1 token, plus 0.5 ms a token). Only its shape matters to
# `switch_to_prefill`, which compares ratios.
def linear_forward_s(fixed_s: float = 0.010, per_token_s: float = 0.0005) -> Callable[[int], float]:
    return lambda n: fixed_s + per_token_s * n


def profiled_forward_s(stages: Sequence[tuple[StageProfile, int]], context: int = BALANCE_CONTEXT) -> Callable[[int], float]:
    """The whole pipeline's forward time of a batch of n tokens, in seconds, from each stage's
    profile and its number of layers (embedding on the first, LM head on the last)."""
    def forward_s(n: int) -> float:
        ms = stages[0][0].embed(n) + stages[-1][0].head(min(n, stages[-1][0].num_seqs(n)))
        ms += sum(layers * profile.layer(n, context) for profile, layers in stages)
        return ms / 1e3
    return forward_s


@dataclass(frozen=True)
class Switch:
    """One phase switch, with the numbers that decided it (logged, and kept for the timeline)."""

    to: Phase
    reason: str
    running: int
    waiting: int
    decision: SwitchDecision | None = None


class TemporalPhases:
    """TD-Pipe's phase for the whole pipeline, and its three decisions.

    In PREFILL the scheduler admits waiting prompts only (no decode rows), each while `admits`
    says the projected KV peak stays under `share` of the blocks; when the next prompt does not
    fit, or none waits, the phase turns to DECODE. In DECODE the scheduler runs decode rows only,
    spread evenly over the micro-batches in flight; after each decode micro-batch, with prompts
    waiting that fit, `switch_to_prefill` on the stages' forward time decides whether to go back.
    With nothing left to decode and prompts waiting, the phase turns to PREFILL.
    """

    def __init__(self, num_blocks: int, block_size: int, num_stages: int,
                 forward_s: Callable[[int], float] | None = None, saturating_tokens: int = 256,
                 predictor: OutputLengthPredictor | None = None, share: float = MEMORY_SHARE,
                 num_host_blocks: int = 0):
        self.num_blocks, self.block_size, self.num_stages = num_blocks, block_size, num_stages
        self.num_host_blocks = num_host_blocks
        self.forward_s = forward_s or linear_forward_s()
        self.saturating_tokens = saturating_tokens
        self.predictor: OutputLengthPredictor = predictor or BucketMeans()
        self.share = share
        self.phase = Phase.PREFILL
        self.switches: list[Switch] = []
        self.num_switches = {Phase.PREFILL: 0, Phase.DECODE: 0}

    def switch_counts(self) -> tuple[int, int]:
        """The switches so far: to prefill, to decode."""
        return self.num_switches[Phase.PREFILL], self.num_switches[Phase.DECODE]

    def predict(self, prompt_len: int, max_tokens: int, hint: int | None = None) -> int:
        return self.predictor.predict(prompt_len, max_tokens, hint)

    def observe(self, prompt_len: int, output_len: int) -> None:
        self.predictor.observe(prompt_len, output_len)

    def projection(self, running: Iterable[Running], free_blocks: int | None = None) -> Projection:
        """The projection admissions are checked against: its peak under `share` of the blocks,
        the KV store's included (a sequence that outgrows the stages' blocks is swapped out and
        back, PipeMax's offload, which costs far less than the recompute TD-Pipe's margin avoids
        on a GPU), and each prompt's blocks among the `free_blocks` now."""
        return Projection(running, self.block_size, self.share * (self.num_blocks + self.num_host_blocks),
                          free_blocks=free_blocks)

    def what_may_run(self, seqs: Mapping[str, Seq], waiting: Sequence[str], any_in_flight: bool,
                     free_blocks: int | None = None) -> tuple[bool, bool, Projection | None]:
        """Whether the scheduler's next micro-batch over `seqs` may take decodes, and prompts
        (`waiting` in line), and the projection its admissions are checked against (or None);
        `free_blocks`: the blocks an allocation can take now."""
        statuses = {s.status for s in seqs.values()}
        if self.phase is Phase.DECODE and not waiting and Status.PREFILLING not in statuses:
            return True, False, None  # steady decode, no prompt to weigh: no projection to build
        projection = self.projection((as_running(s) for s in seqs.values() if s.status is not Status.WAITING),
                                     free_blocks)
        phase = self.begin_step(projection, head_of_line(seqs, waiting), len(waiting),
                                prefilling=Status.PREFILLING in statuses,
                                can_decode=bool(statuses & {Status.READY, Status.SWAPPED}) or any_in_flight)
        return phase is Phase.DECODE, phase is Phase.PREFILL, projection

    def begin_step(self, projection: Projection, head: Running | None, num_waiting: int, *,
                   prefilling: bool = False, can_decode: bool = True) -> Phase:
        """The phase for the next micro-batch. PREFILL turns to DECODE once no prompt is part-way
        through its chunks and the head of the queue no longer fits, or none waits, while
        something runs; DECODE turns to PREFILL when nothing is left to decode (none ready,
        swapped out or in flight) and a prompt waits or is part-way through."""
        running = projection.num_running
        if self.phase is Phase.PREFILL and running and not prefilling and (head is None or not projection.fits(head)):
            self._switch(Phase.DECODE, "the next prompt does not fit the projected memory" if head else "no prompt waits",
                         running, num_waiting)
        elif self.phase is Phase.DECODE and not can_decode and (head is not None or prefilling):
            self._switch(Phase.PREFILL, "nothing left to decode", running, num_waiting)
        return self.phase

    def after_decode(self, decode_tokens: int, waiting_prompt_lens: Sequence[int], projection: Projection,
                     head: Running | None) -> SwitchDecision | None:
        """After a decode micro-batch of `decode_tokens` rows: switch to PREFILL when the waiting
        prompts would use the stages better than this decode batch does, and the head one fits."""
        if self.phase is not Phase.DECODE or head is None or not projection.fits_or_alone(head):
            return None
        decision = switch_to_prefill(decode_tokens, waiting_prompt_lens, self.num_stages, self.forward_s,
                                     self.saturating_tokens)
        if decision.switch:
            self._switch(Phase.PREFILL, "decode intensity under the prefill round's", projection.num_running,
                         len(waiting_prompt_lens), decision)
        return decision

    def _switch(self, to: Phase, reason: str, running: int, waiting: int, decision: SwitchDecision | None = None) -> None:
        self.phase = to
        self.num_switches[to] += 1
        switch = Switch(to, reason, running, waiting, decision)
        self.switches.append(switch)
        del self.switches[:-64]  # the recent ones only
        if decision is not None:
            log.info("phase -> %s: %s (running %d, waiting %d; intensity %.3f < threshold %.3f, prefill round "
                     "%.1f ms, bubble %.1f ms)", to.value, reason, running, waiting, decision.intensity,
                     decision.threshold, decision.prefill_s * 1e3, decision.bubble_s * 1e3)
        else:
            log.info("phase -> %s: %s (running %d, waiting %d)", to.value, reason, running, waiting)


def for_stages(num_blocks: int, block_size: int, max_num_batched_tokens: int,
               stage_infos: Sequence[Any], num_host_blocks: int = 0) -> TemporalPhases:
    """Temporal phases for a pipeline whose stages answered GetStageInfo with `stage_infos`: their
    start-up profiles give T(n) when every stage measured one, else `linear_forward_s`'s shape;
    `num_host_blocks`: the KV store's room, in blocks (0: none)."""
    forward_s = None
    if stage_infos and all(info.profile_json for info in stage_infos):
        forward_s = profiled_forward_s([(parse_profile(info.profile_json, f"stage {i}'s profile"),
                                         info.layer_end - info.layer_start) for i, info in enumerate(stage_infos)])
    forward_s = forward_s or linear_forward_s()
    return TemporalPhases(num_blocks, block_size, max(1, len(stage_infos)), forward_s,
                          saturating_tokens=saturating_tokens(forward_s, max_num_batched_tokens),
                          num_host_blocks=num_host_blocks)


def saturating_tokens(forward_s: Callable[[int], float], most: int, share: float = 0.9) -> int:
    """B*: the fewest tokens in a batch (powers of two up to `most`) whose tokens a second reach
    `share` of the best rate among them; past it, bigger batches gain little."""
    sizes = [1 << k for k in range(max(1, most).bit_length()) if 1 << k <= most]
    rates = {n: n / forward_s(n) for n in sizes}
    best = max(rates.values())
    return next(n for n in sizes if rates[n] >= share * best)
