"""Named sets of technique switches for a whole deployment.

`full` turns every technique on. `baseline` turns them all off and gives a vLLM-style
pipeline with the same number of micro-batches in flight, so that the ratio between the two
measures the techniques, not pipelining itself.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, bool]] = {
    "full": {},
    "baseline": {},
}
