"""Named sets of technique switches for a whole deployment.

Each technique has its own switch, so a benchmark can measure what each is worth. `full`
turns every technique on. `baseline` turns them all off and gives a vLLM-style pipeline with
the same stages and the same number of micro-batches in flight, so that the ratio between the
two measures the techniques, not pipelining itself.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def sampler_options(self) -> dict[str, bool]:
        """The SamplerConfig fields of a sampler replica."""
        return {"fast_sampler": self.fast_sampler}

    def stage_options(self, is_last: bool) -> dict[str, bool]:
        """The StageWorkerConfig fields of a stage; without CPU sampling the last one samples."""
        return {"sample_on_stage": is_last and not self.cpu_sampling, "fast_sampler": self.fast_sampler,
                "overlap_input_prep": self.token_safe_prep}


PRESETS: dict[str, Techniques] = {
    "full": Techniques(cpu_sampling=True, fast_sampler=True, token_safe_prep=True),
    "baseline": Techniques(cpu_sampling=False, fast_sampler=False, token_safe_prep=False),
}
