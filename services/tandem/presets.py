"""Named sets of technique switches for a whole deployment.

Each technique has its own switch, so a benchmark can measure what each is worth. `full`
turns every technique on. `baseline` turns them all off and gives a vLLM-style pipeline with
the same stages and the same number of micro-batches in flight, so that the ratio between the
two measures the techniques, not pipelining itself. `full-SWITCH` is `full` with one switch
off and `baseline+SWITCH` is `baseline` with one switch on: what one technique is worth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Techniques:
    cpu_sampling: bool
    """Sample on CPU sampler replicas, apart from the stages (off: the last stage samples every
    row itself, in series with its forward pass)."""
    fast_sampler: bool
    """Sample with the fast sampler (candidates first, incremental penalties, preallocated
    buffers) instead of the straightforward one (softmax and a full sort per row)."""
    token_safe_prep: bool
    """Stage workers build step n+1's inputs while step n computes, in two alternating buffers
    (off: input preparation in series with compute)."""
    structured_streams: bool
    """Structure-aware transmission: a stream sends its tensor layout once, then each frame is a
    step tag and raw bytes whose shape the receiver takes from the step plan; samplers get their
    rows' plan from the coordinator ahead of the logits (off: every frame carries its dtype,
    shape and per-row metadata)."""
    shared_memory_logits: bool
    """A sampler on the same host as the last stage reads logits from a shared-memory ring and
    only a slot handle crosses gRPC (off, or on another host: logits bytes go over the stream)."""

    temporal_phases: bool
    """TD-Pipe: the whole pipeline runs prefill micro-batches or decode micro-batches, never mixed,
    admitting prompts while their projected KV fits and switching back to prefill by the stages'
    measured forward time (off: every micro-batch mixes decodes and new prompts, vLLM-style)."""
    greedy_on_stage: bool
    """With CPU sampling: the last stage also hosts a sampler and samples the rows that need only
    an argmax (greedy, no penalty, logit bias or logprobs) next to their logits, the placement
    APEX argues for: an argmax costs less than moving a row of logits to another process; the
    replicas take every other row (off: every row's logits go to a replica)."""
    decode_chaining: bool
    """While every running sequence decodes and nothing waits, a micro-batch's next step is planned
    before its tokens exist, and stage 0 takes the tokens the last stage samples in-process straight
    from it, so no step waits on a round trip through the coordinator (off: every step's plan
    follows the commit of the step before it)."""

    def sampler_options(self) -> dict[str, Any]:
        """The SamplerConfig fields of a sampler replica."""
        return {"fast_sampler": self.fast_sampler}

    def stage_options(self, is_last: bool) -> dict[str, Any]:
        """The StageWorkerConfig fields of a stage; without CPU sampling the last one samples, and
        with greedy_on_stage it samples the argmax-only rows."""
        return {"sample_on_stage": is_last and (not self.cpu_sampling or self.greedy_on_stage), "fast_sampler": self.fast_sampler,
                "overlap_input_prep": self.token_safe_prep, "structured_streams": self.structured_streams,
                "shared_memory_logits": self.shared_memory_logits}

    def coordinator_options(self) -> dict[str, Any]:
        """The CoordinatorConfig fields: samplers get row plans only with structured streams."""
        return {"sample_plans": self.cpu_sampling and self.structured_streams, "temporal_phases": self.temporal_phases,
                "greedy_on_stage": self.cpu_sampling and self.greedy_on_stage, "decode_chaining": self.decode_chaining}


SWITCHES = tuple(f.name for f in dataclasses.fields(Techniques))

PRESETS: dict[str, Techniques] = {
    "full": Techniques(**dict.fromkeys(SWITCHES, True)),
    "baseline": Techniques(**dict.fromkeys(SWITCHES, False)),
}


def resolve(name: str) -> Techniques:
    """A preset by name: `full`, `baseline`, `full-SWITCH` or `baseline+SWITCH`.

    Raises ValueError naming the unknown preset or switch and listing the valid ones.
    """
    if name in PRESETS:
        return PRESETS[name]
    for base, sep, value in (("full", "-", False), ("baseline", "+", True)):
        if name.startswith(base + sep):
            switch = name[len(base) + 1:]
            if switch not in SWITCHES:
                raise ValueError(f"preset {name!r}: unknown switch {switch!r}; switches: {', '.join(SWITCHES)}")
            return dataclasses.replace(PRESETS[base], **{switch: value})
    raise ValueError(f"unknown preset {name!r}; use full, baseline, full-SWITCH or baseline+SWITCH "
                     f"(switches: {', '.join(SWITCHES)})")
