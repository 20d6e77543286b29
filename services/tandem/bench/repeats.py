"""--repeats: every run measured several times, alternating, and summed up as medians.

A machine's throughput moves from one run to the next (by up to 40% on a small shared VM), so
one run of A against one of B can show a difference that is not there. Runs alternate
(A,B,C,A,B,C,...) so that a slow spell falls on all of them alike, and each figure of a run is
the median over its repeats, which one outlier does not move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from tandem.bench import stats

T = TypeVar("T")


def alternate(targets: Sequence[T], num_repeats: int) -> list[tuple[int, T]]:
    """(repeat, target) in the order they run: every target once per repeat; repeats count from 1."""
    if num_repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {num_repeats}")
    return [(repeat, target) for repeat in range(1, num_repeats + 1) for target in targets]


def run_label(name: str, repeat: int, num_repeats: int) -> str:
    """What one repeat's logs, profiles and progress bar are named: the run's name, then ".N" if it repeats."""
    return name if num_repeats == 1 else f"{name}.{repeat}"


def median_figures(repeats: Sequence[Mapping]) -> dict:
    """One run's figures from its repeats' (report.run_figures each, in the order they ran).

    Every figure that is a float in some repeat (throughput, latencies, the bounds and the
    fractions of them) is its median over the repeats that have it, the mean of the middle two
    for an even count. num_failed is the total over the repeats and errors their union. The
    rest, counts and per-stage, per-process and per-request details, is the median repeat's:
    the one with the median output tokens/s (the lower of the middle two for an even count),
    numbered in median_repeat. `repeats` holds every repeat's own figures and
    output_tokens_per_s_all its output tokens/s, in order.
    """
    if not repeats:
        raise ValueError("a run needs at least one repeat")
    throughput = [r["output_tokens_per_s"] for r in repeats]
    by_throughput = sorted(range(len(repeats)), key=lambda i: (throughput[i] is None, throughput[i] or 0.0))
    middle = by_throughput[(len(repeats) - 1) // 2]
    out = {key: value for key, value in repeats[middle].items() if key != "repeat"}
    for key in out:
        values = [r.get(key) for r in repeats]
        if any(isinstance(v, float) for v in values):
            out[key] = stats.median(values)
    out["num_failed"] = sum(r["num_failed"] for r in repeats)
    out["errors"] = sorted({e for r in repeats for e in r.get("errors", [])})[:5]
    out.update(num_repeats=len(repeats), median_repeat=repeats[middle].get("repeat", middle + 1),
               output_tokens_per_s_all=throughput, repeats=list(repeats))
    return out
