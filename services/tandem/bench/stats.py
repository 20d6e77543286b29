"""The arithmetic of a benchmark report: pure functions of numbers, easy to test on their own.

None stands for "cannot be computed" (no samples, a zero denominator) all the way through, so
that a figure that does not apply to a run is left out instead of reported as 0 or inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None if empty.

    The same definition as numpy's default, so figures compare with other tools' reports.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (the mean of the middle two for an even count);
    None if there are none."""
    return percentile([v for v in values if v is not None], 50)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def pairwise_ratios(runs: Mapping[str, Mapping[str, float | None]], keys: Sequence[str]) -> dict[str, dict]:
    """{"a/b": {key: a[key] / b[key]}} for every ordered pair of distinct runs a, b."""
    return {f"{a}/{b}": {key: ratio(runs[a].get(key), runs[b].get(key)) for key in keys}
            for a in runs for b in runs if a != b}


def machine_bound(output_tokens: int, compute_ns: int, num_cores: int) -> float | None:
    """Output tokens/s if `num_cores` cores did nothing but the measured compute, all in parallel.

    The compute could at best be spread evenly over the cores, so the run cannot take less than
    compute_ns / num_cores; no idle time, no communication, no scheduling. It is an upper bound
    on throughput, not a prediction.
    """
    if compute_ns <= 0 or num_cores <= 0:
        return None
    return output_tokens / (compute_ns / 1e9 / num_cores)


def bound_basis(stages: Sequence[Mapping[str, int]], samplers: Sequence[Mapping[str, int]]) -> str:
    """"cpu" if every stage and sampler that computed also counted the CPU time of it, else "wall".

    CPU time leaves out the time a forward pass or a sampling call waited for a core, so on a
    machine with more busy threads than cores it is the truer measure of the work. Services that
    do not count it report 0, and then the bound uses wall-clock compute time for every service
    rather than mixing the two.
    """
    pairs = [(d["compute_ns_total"], d["compute_cpu_ns_total"]) for d in stages] + \
            [(d["sample_ns_total"], d["sample_cpu_ns_total"]) for d in samplers]
    cpu = [cpu_ns for wall_ns, cpu_ns in pairs if wall_ns > 0]
    return "cpu" if cpu and all(cpu) else "wall"


def stage_fractions(delta: Mapping[str, int]) -> dict[str, float | None]:
    """Busy, idle, waiting and forward-pass shares of a stage's window, from counter deltas.

    The window is the stage's own uptime between the two reads, so counters and window come
    from the same clock. Idle is everything not busy: waiting for a plan or for activations.
    """
    window = delta["uptime_ns"]
    busy = ratio(delta["busy_ns_total"], window)
    return {
        "window_s": window / 1e9,
        "busy_fraction": busy,
        "idle_fraction": None if busy is None else 1.0 - busy,
        "wait_fraction": ratio(delta["wait_ns_total"], window),
        "compute_fraction": ratio(delta["compute_ns_total"], window),
    }


def hop_figures(wire_bytes: int, tensor_bytes: int, frames: int, shm_bytes: int = 0) -> dict[str, float | int | None]:
    """Bytes that crossed one hop, and how the serialized size compares with the raw tensors.

    Tensor bytes handed over through shared memory are counted apart (shm_bytes); the ratio is
    of what went on the wire only.
    """
    return {
        "wire_bytes": wire_bytes,
        "shm_bytes": shm_bytes,
        "tensor_bytes": tensor_bytes,
        "frames": frames,
        "wire_to_tensor_ratio": ratio(wire_bytes, tensor_bytes),
        "wire_bytes_per_frame": ratio(wire_bytes, frames),
    }


def time_per_output_token(first_token_s: float, done_s: float, output_tokens: int) -> float | None:
    """Mean gap between output tokens after the first; None with fewer than two tokens."""
    if output_tokens < 2:
        return None
    return (done_s - first_token_s) / (output_tokens - 1)
