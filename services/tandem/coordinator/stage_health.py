"""Which stages are down, since when, and what that means for requests. Bookkeeping only.

A stage whose plan stream breaks has died or restarted, and its KV cache is gone. While any
stage is down nothing is scheduled. With recovery on, the sequences recompute from their tokens
once every stage is back (replay is safe: KV writes and sampling are pure functions of their
inputs); without it, they fail at once. A stage down longer than `timeout_s` fails every
request, and new ones are refused until it is back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageHealth:
    timeout_s: float  # how long a stage may stay down before every request fails
    recover: bool  # recompute the sequences a failure lost (else fail them)
    down_since: dict[int, float] = field(default_factory=dict)  # stage -> time.monotonic() it went down
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def any_down(self) -> bool:
        return bool(self.down_since)

    def down(self, stage: int, reason: str, now: float) -> bool:
        """Mark `stage` down; False if it was down already."""
        if stage in self.down_since:
            return False
        self.down_since[stage], self.reasons[stage] = now, reason
        return True

    def up(self, stage: int) -> bool:
        """Mark `stage` up; False if it was not down."""
        self.reasons.pop(stage, None)
        return self.down_since.pop(stage, None) is not None

    def message(self) -> str:
        return "; ".join(f"stage {i} is down ({self.reasons[i]})" for i in sorted(self.down_since))

    def expired(self, now: float) -> bool:
        """Whether a stage has been down longer than the timeout: requests cannot wait for it."""
        return any(now - since > self.timeout_s for since in self.down_since.values())
