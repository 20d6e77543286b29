"""--timeline: what each stage did over a run, step by step, as a PNG.

Each stage started with a step log (StageWorkerConfig.step_log) writes one JSON line per step:
when it computed, on the host's monotonic clock, and how many prompt tokens and decode rows it
held, and the CPU time its thread got meanwhile. `read_timeline` keeps the steps of the measured
window; `plot_timeline` draws one row per stage, each step a bar coloured by what it held
(prefill only, decode only, or both), with the stage's busy share of the window, so temporal
phases show as long runs of one colour, and the share of its steps' time other processes held
its core (where stages share cores with the coordinator and samplers, that time lengthens a
step and the other stages wait for it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

KINDS = {"prefill": "tab:orange", "decode": "tab:blue", "mixed": "tab:purple"}


def step_kind(step: Mapping) -> str:
    if step["prefill_tokens"] and step["decode_rows"]:
        return "mixed"
    return "prefill" if step["prefill_tokens"] else "decode"


def read_timeline(paths: Sequence[str | Path], window_ns: tuple[int, int]) -> dict:
    """Each stage's steps that overlap the window, in seconds from its start, its busy share, count
    of steps of each kind, and the share of its steps' time its thread did not run (None where the
    log has no CPU times): {"window_s", "stages": [{"steps": [[start, end, kind]], "busy", "kinds",
    "preempted"}]}."""
    start, end = window_ns
    stages = []
    for path in paths:
        steps = []
        wall_ns = cpu_ns = 0  # of the steps wholly inside the window
        for line in Path(path).read_text().splitlines():
            step = json.loads(line)
            if step["end_ns"] > start and step["start_ns"] < end:
                steps.append([max(0.0, (step["start_ns"] - start) / 1e9), (min(step["end_ns"], end) - start) / 1e9,
                              step_kind(step)])
                if "cpu_ns" in step and step["start_ns"] >= start and step["end_ns"] <= end:
                    wall_ns += step["end_ns"] - step["start_ns"]
                    cpu_ns += step["cpu_ns"]
        busy = sum(b - a for a, b, _ in steps)
        kinds = {kind: sum(1 for *_, k in steps if k == kind) for kind in KINDS}
        preempted = max(0.0, 1 - cpu_ns / wall_ns) if wall_ns else None
        stages.append({"steps": steps, "busy": busy / max(1e-9, (end - start) / 1e9), "kinds": kinds,
                       "preempted": preempted})
    return {"window_s": (end - start) / 1e9, "stages": stages}


def plot_timeline(timeline: Mapping, path: str | Path, title: str) -> None:
    """One row per stage: its steps as bars coloured by kind, its busy share in the row's label."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError("--timeline needs matplotlib: pip install 'tandem[bench]'") from None

    stages = timeline["stages"]
    fig = Figure(figsize=(12, 1.2 + 0.8 * len(stages)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row, stage in enumerate(stages):
        for kind, colour in KINDS.items():
            bars = [(a, b - a) for a, b, k in stage["steps"] if k == kind]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour)
    ax.set_yticks(range(len(stages)), [f"stage {i}\n{s['busy']:.0%} busy" + (
        f"\n{s['preempted']:.0%} preempted" if s.get("preempted") is not None else "") for i, s in enumerate(stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, timeline["window_s"])
    ax.set_xlabel("seconds into the measured window")
    ax.set_title(title)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in KINDS.items()], loc="outside upper right", ncols=3)
    fig.savefig(path, dpi=110)
