"""--plot: throughput and latency of every run, side by side, as a PNG.

Uses matplotlib's object API with the Agg canvas, never pyplot, so that no display or
global figure state is involved (the command runs on headless machines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

LATENCIES = (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("tpot_p50_s", "TPOT p50"),
             ("tpot_p99_s", "TPOT p99"))


def plot_runs(runs: Sequence[Mapping], path: str | Path) -> None:
    """Left: output tokens/s per run, with the machine bound outlined where known and, for runs measured
    more than once, the min..max of their repeats as an error bar. Right: latencies in ms."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'tandem[bench]'") from None

    names = [r["name"] for r in runs]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    x = range(len(runs))
    heights = [r["output_tokens_per_s"] or 0 for r in runs]
    spreads = [[v for v in r.get("output_tokens_per_s_all", []) if v is not None] or [h] for r, h in zip(runs, heights)]
    errors = [[h - min(s) for h, s in zip(heights, spreads)], [max(s) - h for h, s in zip(heights, spreads)]] \
        if any(len(s) > 1 for s in spreads) else None
    bars = left.bar(x, heights, yerr=errors, capsize=4, color=[f"C{i}" for i in x], label="measured")
    left.bar_label(bars, fmt="%.0f")
    bounds = [(i, r.get("machine_bound_output_tokens_per_s")) for i, r in enumerate(runs)]
    bounds = [(i, b) for i, b in bounds if b is not None]
    if bounds:
        left.bar([i for i, _ in bounds], [b for _, b in bounds], fill=False, edgecolor="black", linestyle="--",
                 label="machine bound")
        left.legend()
    left.set_xticks(list(x), names)
    left.set_ylabel("output tokens / s")
    left.set_title("Throughput")

    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        offsets = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(LATENCIES))]
        values = [(r.get(key) or 0) * 1e3 for key, _ in LATENCIES]
        right.bar(offsets, values, width, label=r["name"], color=f"C{i}")
    right.set_xticks(range(len(LATENCIES)), [label for _, label in LATENCIES])
    right.set_ylabel("ms")
    right.set_title("Latency")
    right.legend()
    fig.savefig(path, format="png", dpi=100)
